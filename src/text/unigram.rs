//! A compact Unigram (SentencePiece) model for the `tokenizers` pipeline.
//!
//! The `tokenizers` crate's own Unigram model keeps its 250k-piece vocabulary (XLM-R,
//! multilingual-e5) in a trie of hash maps, one per node: about 290 MB resident, more than the
//! rest of the library together. This model keeps the same vocabulary in flat arrays (a trie of
//! sorted edges, the pieces' bytes in one buffer, their scores), about 25 MB, and segments text
//! with the same algorithm (SentencePiece's optimised Viterbi, unknown characters fused), so its
//! tokens, ids and offsets are the crate's (tested against it in `tests/tokenizer.rs`).
//! Normalisation, pre-tokenisation, special tokens and post-processing stay the crate's: this
//! type only replaces its `Model`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use tokenizers::models::unigram::UnigramTrainer;
use tokenizers::{Model, Token};

/// The crate's penalty for an unknown character, below the lowest piece score.
const UNKNOWN_PENALTY: f64 = 10.0;
const NO_PIECE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    first_edge: u32,
    edges: u16,
    /// The piece that ends here, or [`NO_PIECE`].
    piece: u32,
}

#[derive(Debug, Clone, Copy)]
struct Edge {
    byte: u8,
    child: u32,
}

/// A Unigram model over flat arrays. Loads from a `tokenizer.json` `model` object of type
/// `Unigram` without byte fallback.
#[derive(Debug, Clone)]
pub struct CompactUnigram {
    /// Every piece's bytes, concatenated; piece `i` is `bytes[starts[i]..starts[i + 1]]`.
    bytes: String,
    starts: Vec<u32>,
    scores: Vec<f64>,
    nodes: Vec<Node>,
    edges: Vec<Edge>,
    unknown: u32,
    unknown_score: f64,
}

#[derive(Deserialize)]
struct UnigramFile {
    #[serde(rename = "type")]
    kind: String,
    unk_id: Option<usize>,
    vocab: Vec<(String, f64)>,
    #[serde(default)]
    byte_fallback: bool,
}

impl<'de> Deserialize<'de> for CompactUnigram {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let file = UnigramFile::deserialize(deserializer)?;
        if file.kind != "Unigram" {
            return Err(D::Error::custom(format!(
                "the compact model reads Unigram models, not {}",
                file.kind
            )));
        }
        if file.byte_fallback {
            return Err(D::Error::custom(
                "the compact model does not implement byte fallback",
            ));
        }
        let unknown = file
            .unk_id
            .filter(|&id| id < file.vocab.len())
            .ok_or_else(|| D::Error::custom("a Unigram model needs an unk_id inside its vocab"))?;
        CompactUnigram::new(&file.vocab, unknown).map_err(D::Error::custom)
    }
}

impl CompactUnigram {
    /// Builds the model from `(piece, score)` pairs in id order. When a piece appears twice,
    /// the later id wins, as in the crate.
    ///
    /// # Errors
    /// A message if the vocabulary is empty, too large for 32-bit ids, or holds an empty piece.
    pub fn new(vocab: &[(String, f64)], unknown: usize) -> Result<Self, String> {
        if vocab.is_empty() || vocab.len() >= NO_PIECE as usize {
            return Err(format!("a vocabulary of {} pieces", vocab.len()));
        }
        let mut bytes = String::with_capacity(vocab.iter().map(|(p, _)| p.len()).sum());
        let mut starts = Vec::with_capacity(vocab.len() + 1);
        for (piece, _) in vocab {
            if piece.is_empty() {
                return Err("an empty piece in the vocabulary".into());
            }
            starts.push(bytes.len() as u32);
            bytes.push_str(piece);
        }
        starts.push(bytes.len() as u32);
        let scores: Vec<f64> = vocab.iter().map(|(_, s)| *s).collect();
        let min_score = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let mut model = CompactUnigram {
            bytes,
            starts,
            scores,
            nodes: Vec::new(),
            edges: Vec::new(),
            unknown: unknown as u32,
            unknown_score: min_score - UNKNOWN_PENALTY,
        };
        model.build_trie();
        Ok(model)
    }

    fn piece(&self, id: u32) -> &[u8] {
        let id = id as usize;
        &self.bytes.as_bytes()[self.starts[id] as usize..self.starts[id + 1] as usize]
    }

    /// Breadth first over the pieces sorted by bytes, so that each node's edges are contiguous
    /// and sorted, without an intermediate pointer trie.
    fn build_trie(&mut self) {
        let mut order: Vec<u32> = (0..self.scores.len() as u32).collect();
        // Stable, so duplicates stay in id order and the last one (the crate's winner) is last.
        order.sort_by(|&a, &b| self.piece(a).cmp(self.piece(b)));
        let mut nodes = vec![Node {
            first_edge: 0,
            edges: 0,
            piece: NO_PIECE,
        }];
        let mut edges = Vec::new();
        // (node, range of `order` below it, depth)
        let mut queue = std::collections::VecDeque::from([(0usize, 0..order.len(), 0usize)]);
        while let Some((node, range, depth)) = queue.pop_front() {
            let mut i = range.start;
            // Pieces that end at this node sort first (they are prefixes of the rest).
            while i < range.end && self.piece(order[i]).len() == depth {
                nodes[node].piece = order[i];
                i += 1;
            }
            nodes[node].first_edge = edges.len() as u32;
            while i < range.end {
                let byte = self.piece(order[i])[depth];
                let mut j = i;
                while j < range.end && self.piece(order[j])[depth] == byte {
                    j += 1;
                }
                let child = nodes.len();
                nodes.push(Node {
                    first_edge: 0,
                    edges: 0,
                    piece: NO_PIECE,
                });
                edges.push(Edge {
                    byte,
                    child: child as u32,
                });
                queue.push_back((child, i..j, depth + 1));
                i = j;
            }
            nodes[node].edges = (edges.len() as u32 - nodes[node].first_edge) as u16;
        }
        nodes.shrink_to_fit();
        edges.shrink_to_fit();
        self.nodes = nodes;
        self.edges = edges;
    }

    fn child(&self, node: u32, byte: u8) -> Option<u32> {
        let n = self.nodes[node as usize];
        let edges = &self.edges[n.first_edge as usize..n.first_edge as usize + n.edges as usize];
        edges
            .binary_search_by_key(&byte, |e| e.byte)
            .ok()
            .map(|i| edges[i].child)
    }

    /// The id of exactly `piece`, if it is in the vocabulary.
    fn find(&self, piece: &[u8]) -> Option<u32> {
        let mut node = 0;
        for &b in piece {
            node = self.child(node, b)?;
        }
        Some(self.nodes[node as usize].piece).filter(|&p| p != NO_PIECE)
    }

    /// Segments `sentence` into `(start, end, id)` pieces: the best-scoring path, where a
    /// character no piece starts with becomes the unknown piece, and runs of unknown pieces
    /// are fused into one (looked up again: the run may spell a piece).
    fn segment(&self, sentence: &str) -> Vec<(usize, usize, u32)> {
        #[derive(Clone, Copy)]
        struct Best {
            id: u32,
            score: f64,
            start: Option<usize>,
        }
        let bytes = sentence.as_bytes();
        let size = bytes.len();
        let mut best = vec![
            Best {
                id: 0,
                score: 0.0,
                start: None
            };
            size + 1
        ];
        let mut start = 0;
        while start < size {
            let here = best[start].score;
            let char_len = sentence[start..].chars().next().map_or(1, char::len_utf8);
            let mut has_single = false;
            let mut node = 0;
            for (len, &b) in bytes[start..].iter().enumerate() {
                let Some(next) = self.child(node, b) else {
                    break;
                };
                node = next;
                let piece = self.nodes[node as usize].piece;
                if piece == NO_PIECE {
                    continue;
                }
                let end = start + len + 1;
                let score = self.scores[piece as usize] + here;
                let target = &mut best[end];
                if target.start.is_none() || score > target.score {
                    *target = Best {
                        id: piece,
                        score,
                        start: Some(start),
                    };
                }
                has_single |= len + 1 == char_len;
            }
            if !has_single {
                let score = self.unknown_score + here;
                let target = &mut best[start + char_len];
                if target.start.is_none() || score > target.score {
                    *target = Best {
                        id: self.unknown,
                        score,
                        start: Some(start),
                    };
                }
            }
            start += char_len;
        }
        let mut pieces = Vec::new();
        let mut unknown_run: Option<(usize, usize)> = None;
        let mut end = size;
        while end > 0 {
            let node = best[end];
            let start = node
                .start
                .expect("every char boundary is reached by some piece");
            if node.id == self.unknown {
                unknown_run = Some((start, unknown_run.map_or(end, |(_, e)| e)));
            } else {
                if let Some((s, e)) = unknown_run.take() {
                    pieces.push(self.fused(sentence, s, e));
                }
                pieces.push((start, end, node.id));
            }
            end = start;
        }
        if let Some((s, e)) = unknown_run {
            pieces.push(self.fused(sentence, s, e));
        }
        pieces.reverse();
        pieces
    }

    fn fused(&self, sentence: &str, start: usize, end: usize) -> (usize, usize, u32) {
        let id = self
            .find(&sentence.as_bytes()[start..end])
            .unwrap_or(self.unknown);
        (start, end, id)
    }
}

impl Model for CompactUnigram {
    type Trainer = UnigramTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        Ok(self
            .segment(sequence)
            .into_iter()
            .map(|(start, end, id)| Token::new(id, sequence[start..end].to_string(), (start, end)))
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.find(token.as_bytes())
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        ((id as usize) < self.scores.len())
            .then(|| String::from_utf8_lossy(self.piece(id)).into_owned())
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        (0..self.scores.len() as u32)
            .map(|id| (String::from_utf8_lossy(self.piece(id)).into_owned(), id))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.scores.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("the compact Unigram model is read-only".into())
    }

    fn get_trainer(&self) -> UnigramTrainer {
        UnigramTrainer::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(pieces: &[(&str, f64)]) -> CompactUnigram {
        let vocab: Vec<(String, f64)> = pieces.iter().map(|(p, s)| (p.to_string(), *s)).collect();
        CompactUnigram::new(&vocab, 0).unwrap()
    }

    #[test]
    fn best_path_wins_and_unknowns_fuse() {
        let m = model(&[
            ("<unk>", 0.0),
            ("ab", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("abc", -5.0),
        ]);
        let ids: Vec<u32> = m.segment("ab").iter().map(|p| p.2).collect();
        assert_eq!(ids, vec![1]);
        // "xy" are unknown: one fused piece; "c" alone is unknown too.
        assert_eq!(m.segment("xyab"), vec![(0, 2, 0), (2, 4, 1)]);
        assert_eq!(m.segment("abc"), vec![(0, 3, 4)]);
        assert_eq!(m.segment("é"), vec![(0, 2, 0)]);
        assert_eq!(m.token_to_id("abc"), Some(4));
        assert_eq!(m.token_to_id("abcd"), None);
        assert_eq!(m.id_to_token(2).as_deref(), Some("a"));
    }

    #[test]
    fn a_duplicate_piece_takes_its_last_id() {
        let m = model(&[("<unk>", 0.0), ("a", -1.0), ("a", -3.0)]);
        assert_eq!(m.token_to_id("a"), Some(2));
    }
}
