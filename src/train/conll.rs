//! CoNLL files (`token TAB tag`, a blank line between sentences) and entity-level scoring with
//! the conlleval definition: an entity is a maximal run of tokens of one type that starts at
//! `B-X` (or at an `I-X` that does not continue an entity of type X) and continues over `I-X`;
//! a predicted entity counts only if its span and type both match a gold entity exactly.

use std::collections::BTreeMap;
use std::path::Path;

use crate::entities::{EntityLabel, Tag};
use crate::error::{Error, Result};

/// One sentence of a CoNLL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConllSentence {
    /// The tokens.
    pub tokens: Vec<String>,
    /// One tag per token.
    pub tags: Vec<Tag>,
    /// Line number of the sentence's first token (1-based), for messages.
    pub line: usize,
}

/// Reads a CoNLL file.
///
/// # Errors
/// [`Error::Io`] if unreadable; [`Error::Config`] naming the file and line of the first
/// malformed line (no tab, empty token, unknown tag, too many columns).
pub fn read_conll(path: &Path) -> Result<Vec<ConllSentence>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_conll(&text, path)
}

/// Parses CoNLL text; `path` is used in error messages only.
///
/// # Errors
/// As [`read_conll`].
pub fn parse_conll(text: &str, path: &Path) -> Result<Vec<ConllSentence>> {
    let mut sentences = Vec::new();
    let mut current = ConllSentence {
        tokens: Vec::new(),
        tags: Vec::new(),
        line: 1,
    };
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.trim().is_empty() {
            if !current.tokens.is_empty() {
                sentences.push(std::mem::replace(
                    &mut current,
                    ConllSentence {
                        tokens: Vec::new(),
                        tags: Vec::new(),
                        line: line_no + 1,
                    },
                ));
            } else {
                current.line = line_no + 1;
            }
            continue;
        }
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message: format!("line {line_no}: {message}"),
        };
        let mut cols = line.split('\t');
        let (token, tag) = match (cols.next(), cols.next(), cols.next()) {
            (Some(t), Some(g), None) => (t, g),
            (Some(_), None, _) => {
                return Err(bad(format!("expected `token<TAB>tag`, found {line:?}")))
            }
            _ => {
                return Err(bad(format!(
                    "expected two tab-separated columns, found {line:?}"
                )))
            }
        };
        if token.is_empty() {
            return Err(bad("empty token".into()));
        }
        let tag: Tag = tag.trim().parse().map_err(|e| bad(format!("{e}")))?;
        if current.tokens.is_empty() {
            current.line = line_no;
        }
        current.tokens.push(token.to_string());
        current.tags.push(tag);
    }
    if !current.tokens.is_empty() {
        sentences.push(current);
    }
    Ok(sentences)
}

/// Groups consecutive sentences into runs of at most `max_words` words (a longer sentence
/// stands alone), as ranges of sentence indices. Encoding a run rather than a lone sentence
/// gives each word the kind of surrounding text it has in an article, which is what the NER
/// head sees at inference.
pub fn pack_sentences(word_counts: &[usize], max_words: usize) -> Vec<std::ops::Range<usize>> {
    let mut packs = Vec::new();
    let (mut start, mut words) = (0, 0);
    for (i, &n) in word_counts.iter().enumerate() {
        if i > start && words + n > max_words {
            packs.push(start..i);
            (start, words) = (i, 0);
        }
        words += n;
    }
    if start < word_counts.len() {
        packs.push(start..word_counts.len());
    }
    packs
}

/// Entities in a tag sequence as `(start, end, label)` token ranges, by the conlleval rules.
pub fn entity_spans(tags: &[Tag]) -> Vec<(usize, usize, EntityLabel)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, EntityLabel)> = None;
    for (i, &tag) in tags.iter().enumerate() {
        let continues = matches!((tag, open), (Tag::I(l), Some((_, o))) if l == o);
        if !continues {
            if let Some((start, label)) = open.take() {
                out.push((start, i, label));
            }
            open = match tag {
                Tag::B(l) | Tag::I(l) => Some((i, l)),
                Tag::O => None,
            };
        }
    }
    if let Some((start, label)) = open {
        out.push((start, tags.len(), label));
    }
    out
}

/// Precision, recall and F1 for one entity type or overall.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntityPrf {
    /// Correct predicted entities.
    pub correct: usize,
    /// Predicted entities.
    pub predicted: usize,
    /// Gold entities.
    pub gold: usize,
}

impl EntityPrf {
    /// Precision (0 with no predictions).
    pub fn precision(&self) -> f64 {
        if self.predicted == 0 {
            0.0
        } else {
            self.correct as f64 / self.predicted as f64
        }
    }
    /// Recall (0 with no gold entities).
    pub fn recall(&self) -> f64 {
        if self.gold == 0 {
            0.0
        } else {
            self.correct as f64 / self.gold as f64
        }
    }
    /// F1 (0 when precision and recall are both 0).
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

/// Entity-level scores: per type and micro-averaged over all types.
#[derive(Debug, Clone, PartialEq)]
pub struct NerScores {
    /// Per entity type.
    pub per_label: BTreeMap<EntityLabel, EntityPrf>,
    /// All types together (conlleval's overall figure).
    pub micro: EntityPrf,
}

/// Scores predicted tag sequences against gold ones, sentence by sentence.
///
/// # Panics
/// If the two lists, or any pair of sentences, differ in length: that is a caller's bug.
pub fn score_entities(gold: &[Vec<Tag>], predicted: &[Vec<Tag>]) -> NerScores {
    assert_eq!(
        gold.len(),
        predicted.len(),
        "one predicted sentence per gold sentence"
    );
    let zero = EntityPrf {
        correct: 0,
        predicted: 0,
        gold: 0,
    };
    let mut per_label: BTreeMap<EntityLabel, EntityPrf> =
        EntityLabel::ALL.iter().map(|&l| (l, zero)).collect();
    let mut micro = zero;
    for (g, p) in gold.iter().zip(predicted) {
        assert_eq!(g.len(), p.len(), "predicted tags for every gold token");
        let gs = entity_spans(g);
        let ps = entity_spans(p);
        for &(_, _, l) in &gs {
            per_label.get_mut(&l).expect("all labels present").gold += 1;
            micro.gold += 1;
        }
        for span in &ps {
            per_label
                .get_mut(&span.2)
                .expect("all labels present")
                .predicted += 1;
            micro.predicted += 1;
            if gs.contains(span) {
                per_label
                    .get_mut(&span.2)
                    .expect("all labels present")
                    .correct += 1;
                micro.correct += 1;
            }
        }
    }
    NerScores { per_label, micro }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &str) -> Vec<Tag> {
        s.split_whitespace().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn spans_follow_conlleval() {
        assert_eq!(
            entity_spans(&tags("B-PER I-PER O B-LOC B-LOC I-LOC I-ORG O")),
            vec![
                (0, 2, EntityLabel::Per),
                (3, 4, EntityLabel::Loc),
                (4, 6, EntityLabel::Loc),
                (6, 7, EntityLabel::Org)
            ]
        );
        // An I- after O or after another type starts an entity.
        assert_eq!(
            entity_spans(&tags("O I-MISC I-MISC B-PER I-ORG")),
            vec![
                (1, 3, EntityLabel::Misc),
                (3, 4, EntityLabel::Per),
                (4, 5, EntityLabel::Org)
            ]
        );
        assert!(entity_spans(&[]).is_empty());
    }

    /// Hand-computed: gold has 4 entities, prediction 4, of which 2 match exactly.
    #[test]
    fn scores_match_hand_computation() {
        let gold = vec![tags("B-PER I-PER O B-LOC"), tags("B-ORG O B-MISC")];
        let pred = vec![tags("B-PER I-PER O B-ORG"), tags("B-ORG I-ORG B-MISC")];
        let s = score_entities(&gold, &pred);
        assert_eq!(
            (s.micro.correct, s.micro.predicted, s.micro.gold),
            (2, 4, 4)
        );
        assert!((s.micro.f1() - 0.5).abs() < 1e-12);
        assert_eq!(s.per_label[&EntityLabel::Per].f1(), 1.0);
        assert_eq!(s.per_label[&EntityLabel::Loc].recall(), 0.0);
        assert_eq!(s.per_label[&EntityLabel::Org].precision(), 0.0);
        assert_eq!(s.per_label[&EntityLabel::Misc].f1(), 1.0);
    }

    #[test]
    fn reader_reports_file_and_line() {
        let ok = parse_conll(
            "Jan\tB-PER\nwoont\tO\n\nin\tO\nGent\tB-LOC\n",
            Path::new("x.conll"),
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].line, 4);
        assert_eq!(ok[1].tags, tags("O B-LOC"));
        let err = parse_conll("Jan\tB-PER\nwoont O\n", Path::new("x.conll"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.conll") && err.contains("line 2"), "{err}");
        let err = parse_conll("Jan\tB-PERSON\n", Path::new("y.conll"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("B-PERSON"), "{err}");
    }

    #[test]
    fn packs_consecutive_sentences_under_the_word_budget() {
        assert_eq!(
            pack_sentences(&[3, 4, 2, 9, 1], 7),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(pack_sentences(&[3, 4, 2], 100), vec![0..3]);
        assert!(pack_sentences(&[], 5).is_empty());
    }
}
