//! Named-entity types and BIO tags, named in one table.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The type of a named entity.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum EntityLabel {
    /// A person.
    #[serde(rename = "PER")]
    Per,
    /// An organisation.
    #[serde(rename = "ORG")]
    Org,
    /// A place.
    #[serde(rename = "LOC")]
    Loc,
    /// Any other name (events, nationalities, works, products...).
    #[serde(rename = "MISC")]
    Misc,
}

impl EntityLabel {
    /// Every label, in tag-index order.
    pub const ALL: [EntityLabel; 4] = [
        EntityLabel::Per,
        EntityLabel::Org,
        EntityLabel::Loc,
        EntityLabel::Misc,
    ];

    /// `PER`, `ORG`, `LOC` or `MISC`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityLabel::Per => "PER",
            EntityLabel::Org => "ORG",
            EntityLabel::Loc => "LOC",
            EntityLabel::Misc => "MISC",
        }
    }
}

impl fmt::Display for EntityLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A BIO (IOB2) tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tag {
    /// Outside any entity.
    O,
    /// First token of an entity.
    B(EntityLabel),
    /// A following token of an entity.
    I(EntityLabel),
}

impl Tag {
    /// Number of distinct tags (`O` plus `B-`/`I-` of each label).
    pub const COUNT: usize = 1 + 2 * EntityLabel::ALL.len();

    /// Index in `0..Tag::COUNT`: `O`, then `B-X`, `I-X` per label in [`EntityLabel::ALL`] order.
    pub fn index(self) -> usize {
        let label_index = |l: EntityLabel| {
            EntityLabel::ALL
                .iter()
                .position(|&x| x == l)
                .expect("label in ALL")
        };
        match self {
            Tag::O => 0,
            Tag::B(l) => 1 + 2 * label_index(l),
            Tag::I(l) => 2 + 2 * label_index(l),
        }
    }

    /// The tag with index `i` (see [`Tag::index`]); `None` out of range.
    pub fn from_index(i: usize) -> Option<Tag> {
        match i {
            0 => Some(Tag::O),
            i if i < Tag::COUNT => {
                let label = EntityLabel::ALL[(i - 1) / 2];
                Some(if (i - 1) % 2 == 0 {
                    Tag::B(label)
                } else {
                    Tag::I(label)
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tag::O => f.write_str("O"),
            Tag::B(l) => write!(f, "B-{l}"),
            Tag::I(l) => write!(f, "I-{l}"),
        }
    }
}

impl FromStr for Tag {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s == "O" {
            return Ok(Tag::O);
        }
        let bad = || {
            Error::Setting(format!(
                "unknown tag `{s}`: expected O, or B-/I- followed by PER, ORG, LOC or MISC"
            ))
        };
        let (prefix, label) = s.split_once('-').ok_or_else(bad)?;
        let label = EntityLabel::ALL
            .into_iter()
            .find(|l| l.as_str() == label)
            .ok_or_else(bad)?;
        match prefix {
            "B" => Ok(Tag::B(label)),
            "I" => Ok(Tag::I(label)),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_through_text_and_index() {
        for i in 0..Tag::COUNT {
            let tag = Tag::from_index(i).unwrap();
            assert_eq!(tag.index(), i);
            assert_eq!(tag.to_string().parse::<Tag>().unwrap(), tag);
        }
        assert!(Tag::from_index(Tag::COUNT).is_none());
        for bad in ["B-DATE", "X-PER", "B", ""] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }
}

/// A named-entity mention in an article.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Entity {
    /// The mention as written: `text[start..end]` of the original.
    pub text: String,
    /// Its type.
    pub label: EntityLabel,
    /// Byte offset of the first byte in the original text.
    pub start: usize,
    /// Byte offset one past the last byte in the original text.
    pub end: usize,
    /// Mean probability of the mention's word tags.
    pub score: f32,
}

/// Mentions with the same surface form and type, grouped.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EntityGroup {
    /// The surface form.
    pub text: String,
    /// Its type.
    pub label: EntityLabel,
    /// Byte ranges `(start, end)` of every mention, in text order.
    pub mentions: Vec<(usize, usize)>,
    /// Highest mention score.
    pub score: f32,
}

/// Groups mentions by surface form and type, in order of first mention.
pub fn group_entities(mentions: &[Entity]) -> Vec<EntityGroup> {
    let mut groups: Vec<EntityGroup> = Vec::new();
    for m in mentions {
        match groups
            .iter_mut()
            .find(|g| g.text == m.text && g.label == m.label)
        {
            Some(g) => {
                g.mentions.push((m.start, m.end));
                g.score = g.score.max(m.score);
            }
            None => groups.push(EntityGroup {
                text: m.text.clone(),
                label: m.label,
                mentions: vec![(m.start, m.end)],
                score: m.score,
            }),
        }
    }
    groups
}

/// Whether BIO allows `next` after `prev` (`None`: the first word): `I-X` only continues `B-X`
/// or `I-X`.
pub fn bio_allows(prev: Option<Tag>, next: Tag) -> bool {
    match next {
        Tag::I(l) => matches!(prev, Some(Tag::B(p) | Tag::I(p)) if p == l),
        _ => true,
    }
}

/// Repairs a BIO sequence: an `I-X` that does not continue an entity of type X becomes `B-X`.
pub fn repair_bio(tags: &mut [Tag]) {
    let mut prev = Tag::O;
    for t in tags.iter_mut() {
        if let Tag::I(l) = *t {
            if !matches!(prev, Tag::B(p) | Tag::I(p) if p == l) {
                *t = Tag::B(l);
            }
        }
        prev = *t;
    }
}

/// The most probable tag sequence that is valid BIO, from per-word log-probabilities
/// `[words][Tag::COUNT]` (Viterbi; an `I-X` may only follow `B-X` or `I-X`). Unlike a per-word
/// argmax followed by [`repair_bio`], a doubtful `I-` tag is weighed against its neighbours
/// instead of silently starting a new entity.
pub fn decode_bio(log_probs: &[Vec<f32>]) -> Vec<Tag> {
    let n = log_probs.len();
    if n == 0 {
        return Vec::new();
    }
    let tags: Vec<Tag> = (0..Tag::COUNT)
        .map(|i| Tag::from_index(i).expect("in range"))
        .collect();
    let mut score: Vec<f32> = tags
        .iter()
        .zip(&log_probs[0])
        .map(|(&t, &lp)| {
            if bio_allows(None, t) {
                lp
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mut back: Vec<Vec<u8>> = Vec::with_capacity(n);
    for lp in &log_probs[1..] {
        let mut next = vec![f32::NEG_INFINITY; Tag::COUNT];
        let mut from = vec![0u8; Tag::COUNT];
        for (j, &t) in tags.iter().enumerate() {
            for (i, &p) in tags.iter().enumerate() {
                if bio_allows(Some(p), t) && score[i] > next[j] {
                    next[j] = score[i];
                    from[j] = i as u8;
                }
            }
            next[j] += lp[j];
        }
        back.push(from);
        score = next;
    }
    let mut best = (0..Tag::COUNT)
        .max_by(|&a, &b| score[a].total_cmp(&score[b]))
        .expect("Tag::COUNT > 0");
    let mut out = vec![tags[best]; n];
    for (k, from) in back.iter().enumerate().rev() {
        best = from[best] as usize;
        out[k] = tags[best];
    }
    out
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    fn tags(s: &[&str]) -> Vec<Tag> {
        s.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn viterbi_never_starts_with_an_inside_tag() {
        // Word 0 prefers I-PER (invalid at the start): the best valid path is B-PER I-PER.
        let mut lp = vec![vec![-9.0; Tag::COUNT]; 2];
        lp[0][Tag::I(EntityLabel::Per).index()] = -0.1;
        lp[0][Tag::B(EntityLabel::Per).index()] = -2.0;
        lp[0][Tag::O.index()] = -3.0;
        lp[1][Tag::I(EntityLabel::Per).index()] = -0.1;
        assert_eq!(decode_bio(&lp), tags(&["B-PER", "I-PER"]));
    }

    #[test]
    fn viterbi_weighs_a_doubtful_inside_tag_against_its_neighbours() {
        // Argmax gives O I-ORG (repaired to B-ORG); jointly, O O is more probable than
        // any valid path through I-ORG.
        let mut lp = vec![vec![-9.0; Tag::COUNT]; 2];
        lp[0][Tag::O.index()] = -0.2;
        lp[0][Tag::B(EntityLabel::Org).index()] = -3.0;
        lp[1][Tag::I(EntityLabel::Org).index()] = -0.9;
        lp[1][Tag::O.index()] = -1.0;
        assert_eq!(decode_bio(&lp), tags(&["O", "O"]));
        assert!(decode_bio(&[]).is_empty());
    }

    #[test]
    fn repair_turns_orphan_inside_tags_into_beginnings() {
        let mut tags: Vec<Tag> = ["O", "I-PER", "I-PER", "I-ORG", "B-LOC", "I-LOC"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        repair_bio(&mut tags);
        let got: Vec<String> = tags.iter().map(Tag::to_string).collect();
        assert_eq!(got, ["O", "B-PER", "I-PER", "B-ORG", "B-LOC", "I-LOC"]);
    }

    #[test]
    fn groups_by_surface_and_type() {
        let e = |text: &str, label, start| Entity {
            text: text.into(),
            label,
            start,
            end: start + text.len(),
            score: 0.5,
        };
        let groups = group_entities(&[
            e("Europol", EntityLabel::Org, 0),
            e("Gent", EntityLabel::Loc, 10),
            e("Europol", EntityLabel::Org, 20),
        ]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].mentions, vec![(0, 7), (20, 27)]);
    }
}
