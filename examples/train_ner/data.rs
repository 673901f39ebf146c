//! The NER corpora as training and dev splits: sentences packed into runs, lower-cased
//! copies, the encoder's word features (cached), and the rows and tag masks training reads.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use themescan::entities::{EntityLabel, Tag};
use themescan::heads::ner::InputScaling;
use themescan::train::conll::{pack_sentences, read_conll, ConllSentence};
use themescan::Embedder;

use super::{Args, KINDS, LANGS};

/// Training files that append a corpus without a MISC class after one with it: from this
/// sentence on, a name the corpus would call MISC is tagged `O` (see the data README). There
/// an `O` only says "not PER, ORG or LOC", so the loss marginalises over `O`, `B-MISC` and
/// `I-MISC` instead of teaching that such names are not entities. Turkish has no MISC at all,
/// in train and dev alike, so its `O` stays an ordinary label: there, predicting MISC is wrong.
pub(crate) const MISC_UNKNOWN_FROM: [(&str, usize); 3] =
    [("ar", 3_567), ("de", 1_980), ("id", 6_720)];

/// Languages written with letter case that lower-casing does not garble.
pub(crate) const LOWER_CASED: [&str; 7] = ["nl", "en", "es", "de", "ru", "id", "fr"];

/// Sentences of one file, packed into runs; runs spread evenly until `max_words` words.
pub(crate) struct Split {
    pub(crate) lang: &'static str,
    /// `train` or `dev`.
    pub(crate) name: &'static str,
    pub(crate) sentences: Vec<ConllSentence>,
    pub(crate) runs: Vec<Range<usize>>,
    /// Per kind, row-major `[words, hidden]` over the kept runs in order.
    pub(crate) features: Vec<Vec<f32>>,
}

impl Split {
    pub(crate) fn words(&self) -> usize {
        self.runs
            .iter()
            .flat_map(|r| &self.sentences[r.clone()])
            .map(|s| s.tokens.len())
            .sum()
    }

    /// The words of each of `runs`, as the encoder gets them (one text per run).
    pub(crate) fn run_words(&self, runs: &[Range<usize>]) -> Vec<Vec<String>> {
        runs.iter()
            .map(|r| {
                self.sentences[r.clone()]
                    .iter()
                    .flat_map(|s| s.tokens.iter().cloned())
                    .collect()
            })
            .collect()
    }
}

pub(crate) fn select_runs(
    sentences: &[ConllSentence],
    pack: usize,
    max_words: usize,
) -> Vec<Range<usize>> {
    let counts: Vec<usize> = sentences.iter().map(|s| s.tokens.len()).collect();
    let runs = pack_sentences(&counts, pack);
    let total: usize = counts.iter().sum();
    if max_words == 0 || total <= max_words {
        return runs;
    }
    let keep = ((runs.len() as f64) * max_words as f64 / total as f64).ceil() as usize;
    let step = runs.len() as f64 / keep.max(1) as f64;
    (0..keep)
        .map(|i| runs[(i as f64 * step) as usize].clone())
        .collect()
}

/// A lower-cased copy of a split's sentences, with runs spread until `max_words` (0: all).
pub(crate) fn lower_cased(
    split: &Split,
    name: &'static str,
    max_words: usize,
    pack: usize,
) -> Split {
    let sentences: Vec<ConllSentence> = split
        .sentences
        .iter()
        .map(|s| ConllSentence {
            tokens: s.tokens.iter().map(|t| t.to_lowercase()).collect(),
            tags: s.tags.clone(),
            line: s.line,
        })
        .collect();
    let runs = select_runs(&sentences, pack, max_words);
    Split {
        lang: split.lang,
        name,
        sentences,
        runs,
        features: Vec::new(),
    }
}

/// The word features of the kinds in `wanted` for the kept runs, cached; other kinds are left
/// empty.
pub(crate) fn encode(
    embedder: &Embedder,
    split: &mut Split,
    cache: &Path,
    wanted: &[usize],
) -> Result<()> {
    let words = split.words();
    let h = embedder.hidden_size();
    if let Ok(t) = candle_core::safetensors::load(cache, &Device::Cpu) {
        let kinds: Option<Vec<Vec<f32>>> = (0..KINDS.len())
            .map(|k| {
                if !wanted.contains(&k) {
                    return Some(Vec::new());
                }
                t.get(&format!("k{k}"))
                    .filter(|x| x.dims() == [words, KINDS[k].0.width(h)])
                    .and_then(|x| x.flatten_all().ok()?.to_vec1().ok())
            })
            .collect();
        if let Some(kinds) = kinds {
            split.features = kinds;
            return Ok(());
        }
    }
    let started = std::time::Instant::now();
    let mut features: Vec<Vec<f32>> = (0..KINDS.len())
        .map(|k| {
            if wanted.contains(&k) {
                Vec::with_capacity(words * KINDS[k].0.width(h))
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut done = 0;
    for chunk in split.runs.chunks(16) {
        let run_words = split.run_words(chunk);
        let texts: Vec<String> = run_words.iter().map(|w| w.join(" ")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let states = embedder.token_states(&refs)?;
        for (w, state) in run_words.iter().zip(&states) {
            for &k in wanted {
                let (source, pooling) = KINDS[k];
                features[k].extend(state.word_states(w, source, pooling)?);
            }
            done += w.len();
        }
        eprint!(
            "\r  {done}/{words} words, {:.0}s",
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!();
    std::fs::create_dir_all(cache.parent().expect("cache has a parent"))?;
    let mut tensors = HashMap::new();
    for (k, f) in features
        .iter()
        .enumerate()
        .filter(|(k, _)| wanted.contains(k))
    {
        tensors.insert(
            format!("k{k}"),
            Tensor::from_slice(f, (words, KINDS[k].0.width(h)), &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&tensors, cache)?;
    split.features = features;
    Ok(())
}

/// Encodes a split's kept runs (cached, keyed by the split, the CPU path and `encoder_key`,
/// which names fine-tuned layers) and keeps only the features `args.kind` trains.
pub(crate) fn encode_split(
    embedder: &Embedder,
    split: &mut Split,
    args: &Args,
    encoder_key: &str,
) -> Result<()> {
    // Keyed by the path too: int8 and f32 states differ slightly.
    let (wanted, kinds_key) = match args.kind {
        Some(k) => (vec![k], format!("-k{k}")),
        None => ((0..KINDS.len()).collect(), String::new()),
    };
    let cache = PathBuf::from("target/themescan-cache").join(format!(
        "ner-{}-{}-w{}-p{}-l{}-{:?}{encoder_key}{kinds_key}.safetensors",
        split.lang,
        split.name,
        split.words(),
        args.pack_words,
        args.layers,
        embedder.cpu_path()
    ));
    encode(embedder, split, &cache, &wanted)
}

/// A split's standardised word rows for one kind (neighbours are joined per batch, so the
/// training matrix stays one row per word), its gold tags, and per word whether its `O` leaves
/// MISC open (see [`MISC_UNKNOWN_FROM`]).
pub(crate) fn rows(
    split: &Split,
    kind: usize,
    scaling: &InputScaling,
    partial_misc: bool,
) -> (Vec<f32>, Vec<u32>, Vec<bool>) {
    let mut feats = split.features[kind].clone();
    scaling.apply(&mut feats);
    let misc_from = misc_unknown_from(split, partial_misc);
    let mut y = Vec::new();
    let mut misc_open = Vec::new();
    for r in &split.runs {
        for i in r.clone() {
            y.extend(split.sentences[i].tags.iter().map(|t| t.index() as u32));
        }
        misc_open.extend(misc_open_words(split, r.clone(), misc_from));
    }
    (feats, y, misc_open)
}

/// The first sentence of `split` whose `O` leaves MISC open (`usize::MAX`: none), see
/// [`MISC_UNKNOWN_FROM`].
pub(crate) fn misc_unknown_from(split: &Split, partial_misc: bool) -> usize {
    MISC_UNKNOWN_FROM
        .iter()
        .find(|(lang, _)| partial_misc && split.name.starts_with("train") && *lang == split.lang)
        .map_or(usize::MAX, |&(_, from)| from)
}

/// Per word of the sentences `run`, whether its `O` leaves MISC open (sentences from
/// `misc_from` on, see [`misc_unknown_from`]).
pub(crate) fn misc_open_words(
    split: &Split,
    run: Range<usize>,
    misc_from: usize,
) -> impl Iterator<Item = bool> + '_ {
    run.flat_map(move |i| {
        split.sentences[i]
            .tags
            .iter()
            .map(move |&t| i >= misc_from && t == Tag::O)
    })
}

/// Additive log-space masks of the tags each word's label allows: its gold tag, or `O`,
/// `B-MISC` and `I-MISC` where MISC is open. Cross-entropy over the allowed set
/// (`-log Σ p(allowed)`) is ordinary cross-entropy for a single allowed tag.
pub(crate) fn allowed_masks(y: &[u32], misc_open: &[bool]) -> Vec<f32> {
    let misc = [
        Tag::O.index(),
        Tag::B(EntityLabel::Misc).index(),
        Tag::I(EntityLabel::Misc).index(),
    ];
    let mut out = vec![-1e9f32; y.len() * Tag::COUNT];
    for (i, (&t, &open)) in y.iter().zip(misc_open).enumerate() {
        out[i * Tag::COUNT + t as usize] = 0.0;
        if open {
            for m in misc {
                out[i * Tag::COUNT + m] = 0.0;
            }
        }
    }
    out
}

/// Every language's splits, features not yet encoded.
pub(crate) struct Corpora {
    pub(crate) train: Vec<Split>,
    pub(crate) dev: Vec<Split>,
    /// Lower-cased copies of the `--lower-dev` languages' dev splits.
    pub(crate) dev_lower: Vec<Split>,
    /// A line per training file for the card.
    pub(crate) data_note: Vec<String>,
}

/// The training and dev splits of every language in [`LANGS`], with the lower-cased copies
/// that `--lower-fraction` and `--lower-dev` ask for.
pub(crate) fn load_splits(args: &Args) -> Result<Corpora> {
    let mut train = Vec::new();
    let mut dev = Vec::new();
    let mut dev_lower = Vec::new();
    let mut data_note = Vec::new();
    for lang in LANGS {
        for (split_name, max) in [("train", args.max_train_words), ("dev", args.max_dev_words)] {
            let path = args.data.join(lang).join(format!("{split_name}.conll"));
            let sentences =
                read_conll(&path).with_context(|| format!("reading {}", path.display()))?;
            let runs = select_runs(&sentences, args.pack_words, max);
            let split = Split {
                lang,
                name: split_name,
                sentences,
                runs,
                features: Vec::new(),
            };
            let kept: usize = split.runs.iter().map(ExactSizeIterator::len).sum();
            eprintln!(
                "{lang} {split_name}: {} runs, {kept} of {} sentences, {} words",
                split.runs.len(),
                split.sentences.len(),
                split.words()
            );
            let lowered = if split_name == "train" {
                (args.lower_fraction > 0.0 && LOWER_CASED.contains(&lang)).then(|| {
                    let words = (split.words() as f64 * args.lower_fraction) as usize;
                    lower_cased(&split, "train-lower", words.max(1), args.pack_words)
                })
            } else {
                args.lower_dev
                    .iter()
                    .any(|l| l == lang)
                    .then(|| lower_cased(&split, "dev-lower", 0, args.pack_words))
            };
            if split_name == "train" {
                data_note.push(format!(
                    "{lang}/train.conll: {kept} of {} sentences ({} words)",
                    split.sentences.len(),
                    split.words()
                ));
                train.push(split);
            } else {
                dev.push(split);
            }
            if let Some(lowered) = lowered {
                eprintln!("{lang} {}: {} words", lowered.name, lowered.words());
                if lowered.name == "train-lower" {
                    data_note.push(format!(
                        "{lang}/train.conll lower-cased: {} words",
                        lowered.words()
                    ));
                    train.push(lowered);
                } else {
                    dev_lower.push(lowered);
                }
            }
        }
    }
    Ok(Corpora {
        train,
        dev,
        dev_lower,
        data_note,
    })
}
