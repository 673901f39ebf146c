//! Scoring a head on the dev splits (entity-level F1 per language) and choosing its entity
//! bias there.

use anyhow::{Context, Result};
use candle_core::Device;
use themescan::entities::{repair_bio, Tag};
use themescan::heads::ner::{NerCard, NerDevScore, NerHead, NER_HEAD_CARD};
use themescan::train::conll::score_entities;

use super::data::Split;
use super::{Args, KINDS};

/// Per language dev scores of one head, for argmax + repair (`[0]`) and Viterbi (`[1]`).
pub(crate) fn score_dev(
    head: &NerHead,
    dev: &[Split],
    kind: usize,
) -> Result<[Vec<NerDevScore>; 2]> {
    Ok([
        score_dev_with(head, dev, kind, false)?,
        score_dev_with(head, dev, kind, true)?,
    ])
}

/// Per language dev scores of one head with one decoder. Each run is tagged as one sequence,
/// as `Analyzer::tag_words` does.
pub(crate) fn score_dev_with(
    head: &NerHead,
    dev: &[Split],
    kind: usize,
    viterbi: bool,
) -> Result<Vec<NerDevScore>> {
    Ok(score_runs(head, &network_scores(head, dev, kind)?, viterbi))
}

/// One dev run as the network scored it: the scores before any entity bias, and its
/// sentences' gold tags.
#[derive(Clone)]
struct ScoredRun {
    scores: Vec<Vec<f32>>,
    gold: Vec<Vec<Tag>>,
}

/// One language's scored dev runs.
struct ScoredSplit {
    lang: String,
    runs: Vec<ScoredRun>,
}

impl ScoredSplit {
    /// The runs whose index has parity `half` (0 or 1): two halves of a dev set, for
    /// choosing on one and scoring on the other.
    fn half(&self, half: usize) -> ScoredSplit {
        ScoredSplit {
            lang: self.lang.clone(),
            runs: self
                .runs
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == half)
                .map(|(_, r)| r.clone())
                .collect(),
        }
    }
}

/// The network's scores of every dev run, once: the biases are tried on them.
fn network_scores(head: &NerHead, dev: &[Split], kind: usize) -> Result<Vec<ScoredSplit>> {
    let h = head.word_width();
    let mut out = Vec::with_capacity(dev.len());
    for split in dev {
        let feats = &split.features[kind];
        let mut runs = Vec::with_capacity(split.runs.len());
        let mut at = 0;
        for r in &split.runs {
            let sentences = &split.sentences[r.clone()];
            let words: Vec<&str> = sentences
                .iter()
                .flat_map(|s| s.tokens.iter().map(String::as_str))
                .collect();
            let n = words.len();
            let rows = &feats[at * h..(at + n) * h];
            at += n;
            runs.push(ScoredRun {
                scores: head.network_scores(rows, &words)?,
                gold: sentences.iter().map(|s| s.tags.clone()).collect(),
            });
        }
        out.push(ScoredSplit {
            lang: split.lang.to_string(),
            runs,
        });
    }
    Ok(out)
}

/// Per language dev scores of `head` (with its entity bias) on scored runs.
fn score_runs(head: &NerHead, scored: &[ScoredSplit], viterbi: bool) -> Vec<NerDevScore> {
    scored
        .iter()
        .map(|split| {
            let mut gold = Vec::new();
            let mut predicted = Vec::new();
            for run in &split.runs {
                let mut tags = head.decode_scores(run.scores.clone(), viterbi).into_iter();
                for g in &run.gold {
                    let mut t: Vec<Tag> = tags.by_ref().take(g.len()).collect();
                    repair_bio(&mut t);
                    predicted.push(t);
                }
                gold.extend(run.gold.iter().cloned());
            }
            let scores = score_entities(&gold, &predicted);
            NerDevScore {
                lang: split.lang.clone(),
                sentences: gold.len(),
                f1: scores.micro.f1(),
                f1_by_label: scores.per_label.iter().map(|(l, s)| (*l, s.f1())).collect(),
            }
        })
        .collect()
}

/// The feature kind (index in [`KINDS`]) a head's card says it reads.
pub(crate) fn card_kind(card: &NerCard) -> Result<usize> {
    KINDS
        .iter()
        .position(|&(source, pooling)| source == card.token_source && pooling == card.word_pooling)
        .with_context(|| {
            format!(
                "no feature kind reads {:?}/{:?}",
                card.token_source, card.word_pooling
            )
        })
}

/// The entity bias from `grid` with the best F1 on scored runs, the languages weighted by
/// their dev sentences (0 if `grid` is empty), and that F1. Weighted, the large dev sets
/// decide: chosen by the plain mean of languages, the bias followed the small German and
/// Russian sets and differed between halves of dev (+0.25 and −0.75), where weighted it
/// was −0.25 on both.
fn best_entity_bias(
    head: &NerHead,
    scored: &[ScoredSplit],
    viterbi: bool,
    grid: &[f32],
    verbose: bool,
) -> (f32, f64) {
    let mut best = (0.0, f64::NEG_INFINITY);
    for &bias in grid {
        let mean = weighted_f1(&score_runs(
            &head.clone().with_entity_bias(bias),
            scored,
            viterbi,
        ));
        if verbose {
            println!("entity bias {bias:+.2}: dev F1 {mean:.4} (languages weighted by sentences)");
        }
        if mean > best.1 {
            best = (bias, mean);
        }
    }
    best
}

/// Chooses the entity bias of the head in `args.out` on dev and rewrites its card with it
/// and its scores. The network scores each dev run once; each bias of `args.entity_biases`
/// is then only a decoding. The bias moves the balance of precision and recall that
/// training left, which the loss does not aim at (it is per word, F1 is per entity).
///
/// A bias is kept only if it pays on text it was not chosen on: it is chosen on each half
/// of the dev runs and scored on the other, and unless the held-out mean of languages beats
/// no bias, the card gets 0.
pub(crate) fn choose_entity_bias(args: &Args, dev: &[Split], dev_lower: &[Split]) -> Result<()> {
    let (head, mut card) = NerHead::from_folder(&args.out, &Device::Cpu)?;
    let head = head.with_entity_bias(0.0);
    let kind = card_kind(&card)?;
    let scored = network_scores(&head, dev, kind)?;
    let (best, best_weighted) =
        best_entity_bias(&head, &scored, card.viterbi, &args.entity_biases, true);
    let (mut unbiased, mut biased) = (0.0, 0.0);
    for half in 0..2 {
        let fit: Vec<ScoredSplit> = scored.iter().map(|s| s.half(half)).collect();
        let held: Vec<ScoredSplit> = scored.iter().map(|s| s.half(1 - half)).collect();
        let (bias, _) = best_entity_bias(&head, &fit, card.viterbi, &args.entity_biases, false);
        let on_held = |bias: f32| {
            mean_f1(&score_runs(
                &head.clone().with_entity_bias(bias),
                &held,
                card.viterbi,
            ))
        };
        let (without, with) = (on_held(0.0), on_held(bias));
        println!(
            "chosen on dev half {half}: {bias:+.2}; on the other half {with:.4} against {without:.4} without"
        );
        unbiased += without / 2.0;
        biased += with / 2.0;
    }
    let bias = if biased > unbiased { best } else { 0.0 };
    println!(
        "held-out mean {biased:.4} with a bias chosen on the other half, {unbiased:.4} without: \
         entity bias {bias:+.2} (best on all of dev: {best:+.2}, weighted F1 {best_weighted:.4})"
    );
    let head = head.with_entity_bias(bias);
    card.dev = score_runs(&head, &scored, card.viterbi);
    card.dev_lowercased = score_dev_with(&head, dev_lower, kind, card.viterbi)?;
    card.entity_bias = bias;
    for s in &card.dev {
        println!("{}: {:.3}", s.lang, s.f1);
    }
    for s in &card.dev_lowercased {
        println!("{} lower-cased: {:.3}", s.lang, s.f1);
    }
    let path = args.out.join(NER_HEAD_CARD);
    std::fs::write(&path, serde_json::to_string_pretty(&card)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Per-language F1 scores weighted by the languages' dev sentences.
fn weighted_f1(scores: &[NerDevScore]) -> f64 {
    let sentences: usize = scores.iter().map(|s| s.sentences).sum();
    scores
        .iter()
        .map(|s| s.f1 * s.sentences as f64)
        .sum::<f64>()
        / sentences.max(1) as f64
}

/// Mean of the per-language F1 scores: every language counts once, whatever its size.
pub(crate) fn mean_f1(scores: &[NerDevScore]) -> f64 {
    scores.iter().map(|s| s.f1).sum::<f64>() / scores.len().max(1) as f64
}
