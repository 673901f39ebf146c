//! Scoring a head on the dev splits (entity-level F1 per language) and choosing its entity
//! bias there.

use anyhow::{Context, Result};
use candle_core::Device;
use themescan::entities::{repair_bio, Tag};
use themescan::heads::ner::{NerCard, NerDevScore, NerHead, NER_HEAD_CARD};
use themescan::train::conll::score_entities;

use super::data::Split;
use super::{Args, KINDS, LANGS};

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
    let h = head.word_width();
    let mut out = Vec::with_capacity(dev.len());
    for split in dev {
        let feats = &split.features[kind];
        let mut gold = Vec::new();
        let mut predicted = Vec::new();
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
            let mut tags = head.tag_with(rows, &words, viterbi)?.0.into_iter();
            for s in sentences {
                let mut t: Vec<Tag> = tags.by_ref().take(s.tokens.len()).collect();
                repair_bio(&mut t);
                predicted.push(t);
            }
            gold.extend(sentences.iter().map(|s| s.tags.clone()));
        }
        let scores = score_entities(&gold, &predicted);
        out.push(NerDevScore {
            lang: split.lang.to_string(),
            sentences: gold.len(),
            f1: scores.micro.f1(),
            f1_by_label: scores.per_label.iter().map(|(l, s)| (*l, s.f1())).collect(),
        });
    }
    Ok(out)
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

/// Scores the head in `args.out` on dev with each of `args.entity_biases` added to its entity
/// tags, keeps the bias with the best mean F1, and rewrites the card with it and its scores.
/// The bias moves the balance of precision and recall that training left, which the
/// loss does not aim at (it is per word, F1 is per entity).
pub(crate) fn choose_entity_bias(args: &Args, dev: &[Split], dev_lower: &[Split]) -> Result<()> {
    let (head, mut card) = NerHead::from_folder(&args.out, &Device::Cpu)?;
    let kind = card_kind(&card)?;
    println!(
        "\n{:<28} {}  mean",
        "entity bias",
        LANGS.map(|l| format!("{l:>6}")).join("")
    );
    let mut best: Option<(f64, f32, Vec<NerDevScore>)> = None;
    for &bias in &args.entity_biases {
        let scores = score_dev_with(
            &head.clone().with_entity_bias(bias),
            dev,
            kind,
            card.viterbi,
        )?;
        let mean = mean_f1(&scores);
        println!(
            "{:<28} {}  {mean:.3}",
            format!("{bias:+.2}"),
            scores
                .iter()
                .map(|s| format!("{:>6.3}", s.f1))
                .collect::<String>()
        );
        if best.as_ref().is_none_or(|b| mean > b.0) {
            best = Some((mean, bias, scores));
        }
    }
    let (mean, bias, scores) = best.context("--entity-biases is empty")?;
    let head = head.with_entity_bias(bias);
    card.dev_lowercased = score_dev_with(&head, dev_lower, kind, card.viterbi)?;
    card.entity_bias = bias;
    card.dev = scores;
    println!("chosen entity bias {bias:+.2}, mean dev F1 {mean:.3}");
    for s in &card.dev_lowercased {
        println!("{} lower-cased: {:.3}", s.lang, s.f1);
    }
    let path = args.out.join(NER_HEAD_CARD);
    std::fs::write(&path, serde_json::to_string_pretty(&card)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Mean of the per-language F1 scores: every language counts once, whatever its size.
pub(crate) fn mean_f1(scores: &[NerDevScore]) -> f64 {
    scores.iter().map(|s| s.f1).sum::<f64>() / scores.len().max(1) as f64
}
