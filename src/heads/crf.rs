//! Learned tag transitions over the NER head's per-word scores (a linear-chain CRF): the
//! training loss by the forward algorithm, decoding by Viterbi, per-word confidence by
//! forward-backward.
//!
//! A per-word softmax scores each word alone, and the BIO rule only forbids impossible pairs.
//! Transitions learn how likely each allowed pair is (`I-ORG` after `B-ORG`, a new `B-PER` right
//! after a person), and the loss is over whole sequences, so a partial label (MISC unknown in a
//! corpus without MISC) is marginalised over every path it allows.
//!
//! Transition scores are indexed `[from · Tag::COUNT + to]`; the BIO constraint is added to the
//! learned scores, so a forbidden pair never wins.

use candle_core::{Device, Tensor};

use crate::entities::{bio_allows, Tag};
use crate::error::Result;

/// Score added to a forbidden transition in training: low enough that no path through it
/// counts, finite so that gradients stay finite.
const FORBIDDEN_IN_TRAINING: f32 = -1e4;

fn tag(i: usize) -> Tag {
    Tag::from_index(i).expect("index below Tag::COUNT")
}

/// The BIO constraint as additive scores for training: (start `[Tag::COUNT]`, pairs
/// `[Tag::COUNT, Tag::COUNT]`), 0 where allowed.
///
/// # Errors
/// A tensor error.
pub fn training_constraints(device: &Device) -> Result<(Tensor, Tensor)> {
    let c = Tag::COUNT;
    let start: Vec<f32> = (0..c)
        .map(|i| {
            if bio_allows(None, tag(i)) {
                0.0
            } else {
                FORBIDDEN_IN_TRAINING
            }
        })
        .collect();
    let pairs: Vec<f32> = (0..c * c)
        .map(|k| {
            if bio_allows(Some(tag(k / c)), tag(k % c)) {
                0.0
            } else {
                FORBIDDEN_IN_TRAINING
            }
        })
        .collect();
    Ok((
        Tensor::from_vec(start, c, device)?,
        Tensor::from_vec(pairs, (c, c), device)?,
    ))
}

/// Mean negative log-likelihood per word of the allowed tag paths of a padded batch.
///
/// `emissions` `[batch, len, Tag::COUNT]` are the network's scores; `allowed` (same shape)
/// holds 0 for each tag a word's label allows and a large negative number for the others
/// (padding: anything); `lengths` are the real lengths; `start` `[Tag::COUNT]` and `pairs`
/// `[Tag::COUNT, Tag::COUNT]` are the transition scores with the BIO constraint already added
/// ([`training_constraints`]). Both the partition function and the allowed paths' mass come
/// from one forward pass over a doubled batch.
///
/// # Errors
/// A tensor error on a shape mismatch.
pub fn negative_log_likelihood(
    emissions: &Tensor,
    allowed: &Tensor,
    lengths: &[usize],
    start: &Tensor,
    pairs: &Tensor,
) -> Result<Tensor> {
    let (batch, len, c) = emissions.dims3()?;
    let device = emissions.device();
    // Rows 0..batch: every path; rows batch..2·batch: the paths the labels allow.
    let e = Tensor::cat(&[emissions, &(emissions + allowed)?], 0)?;
    let pairs = pairs.unsqueeze(0)?;
    let mut alpha = e.narrow(1, 0, 1)?.squeeze(1)?.broadcast_add(start)?;
    for t in 1..len {
        let live: Vec<f32> = lengths
            .iter()
            .chain(lengths)
            .map(|&n| if t < n { 1.0 } else { 0.0 })
            .collect();
        let live = Tensor::from_vec(live, (2 * batch, 1), device)?;
        let next = alpha
            .unsqueeze(2)?
            .broadcast_add(&pairs)?
            .log_sum_exp(1)?
            .add(&e.narrow(1, t, 1)?.squeeze(1)?)?;
        // Past a sequence's end its alpha stays as it was.
        alpha = (next.broadcast_mul(&live)? + alpha.broadcast_mul(&(1.0 - live)?)?)?;
    }
    let log_z = alpha.log_sum_exp(1)?;
    let all = log_z.narrow(0, 0, batch)?;
    let gold = log_z.narrow(0, batch, batch)?;
    let words: usize = lengths.iter().sum();
    debug_assert_eq!(c, Tag::COUNT);
    Ok(((all - gold)?.sum_all()? / words.max(1) as f64)?)
}

/// Learned transitions with the BIO constraint folded in, for decoding on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Transitions {
    start: Vec<f32>,
    pairs: Vec<f32>,
}

impl Transitions {
    /// From learned start scores `[Tag::COUNT]` and pair scores `[from · Tag::COUNT + to]`;
    /// forbidden BIO transitions become impossible.
    pub fn new(start: &[f32], pairs: &[f32]) -> Self {
        let c = Tag::COUNT;
        Transitions {
            start: (0..c)
                .map(|i| {
                    if bio_allows(None, tag(i)) {
                        start[i]
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect(),
            pairs: (0..c * c)
                .map(|k| {
                    if bio_allows(Some(tag(k / c)), tag(k % c)) {
                        pairs[k]
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect(),
        }
    }

    /// The highest-scoring valid tag path for per-word emissions `[words][Tag::COUNT]`.
    pub fn viterbi(&self, emissions: &[Vec<f32>]) -> Vec<Tag> {
        let c = Tag::COUNT;
        let Some(first) = emissions.first() else {
            return Vec::new();
        };
        let mut score: Vec<f32> = first.iter().zip(&self.start).map(|(e, s)| e + s).collect();
        let mut back: Vec<Vec<u8>> = Vec::with_capacity(emissions.len());
        for e in &emissions[1..] {
            let mut next = vec![f32::NEG_INFINITY; c];
            let mut from = vec![0u8; c];
            for (to, (n, f)) in next.iter_mut().zip(&mut from).enumerate() {
                for (prev, s) in score.iter().enumerate() {
                    let v = s + self.pairs[prev * c + to];
                    if v > *n {
                        *n = v;
                        *f = prev as u8;
                    }
                }
                *n += e[to];
            }
            // Only differences between paths matter; without this the scores of a long
            // article grow until f32 rounding decides between them.
            let top = next.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if top.is_finite() {
                next.iter_mut().for_each(|v| *v -= top);
            }
            back.push(from);
            score = next;
        }
        let mut best = (0..c)
            .max_by(|&a, &b| score[a].total_cmp(&score[b]))
            .expect("Tag::COUNT > 0");
        let mut out = vec![tag(best); emissions.len()];
        for (k, from) in back.iter().enumerate().rev() {
            best = from[best] as usize;
            out[k] = tag(best);
        }
        out
    }

    /// Per-word log-marginals `[words][Tag::COUNT]` (forward-backward): the log-probability
    /// that a word carries each tag, over all valid paths. Forward and backward scores are
    /// renormalised at every word, so a text of thousands of words loses no precision.
    pub fn log_marginals(&self, emissions: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let c = Tag::COUNT;
        let n = emissions.len();
        if n == 0 {
            return Vec::new();
        }
        let log_sum = |xs: &mut dyn Iterator<Item = f32>| {
            let xs: Vec<f32> = xs.collect();
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                return max;
            }
            xs.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max
        };
        // Each row is shifted by its own log-sum: a constant per word, which the final
        // per-word normalisation removes.
        let normalise = |row: &mut Vec<f32>| {
            let total = log_sum(&mut row.iter().copied());
            if total.is_finite() {
                row.iter_mut().for_each(|v| *v -= total);
            }
        };
        let mut alpha = vec![vec![0f32; c]; n];
        for i in 0..c {
            alpha[0][i] = emissions[0][i] + self.start[i];
        }
        normalise(&mut alpha[0]);
        for t in 1..n {
            for to in 0..c {
                let prev = &alpha[t - 1];
                alpha[t][to] = log_sum(&mut (0..c).map(|p| prev[p] + self.pairs[p * c + to]))
                    + emissions[t][to];
            }
            normalise(&mut alpha[t]);
        }
        let mut beta = vec![vec![0f32; c]; n];
        for t in (0..n - 1).rev() {
            for from in 0..c {
                let next = &beta[t + 1];
                let e = &emissions[t + 1];
                beta[t][from] =
                    log_sum(&mut (0..c).map(|k| self.pairs[from * c + k] + e[k] + next[k]));
            }
            normalise(&mut beta[t]);
        }
        alpha
            .iter()
            .zip(&beta)
            .map(|(a, b)| {
                let mut row: Vec<f32> = a.iter().zip(b).map(|(a, b)| a + b).collect();
                normalise(&mut row);
                row
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entities::EntityLabel;

    fn emissions(words: usize, seed: u32) -> Vec<Vec<f32>> {
        let mut x = seed;
        (0..words)
            .map(|_| {
                (0..Tag::COUNT)
                    .map(|_| {
                        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (x >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
                    })
                    .collect()
            })
            .collect()
    }

    /// Every valid path and its score, by enumeration.
    fn paths(t: &Transitions, e: &[Vec<f32>]) -> Vec<(Vec<usize>, f32)> {
        let c = Tag::COUNT;
        let mut out: Vec<(Vec<usize>, f32)> =
            (0..c).map(|i| (vec![i], t.start[i] + e[0][i])).collect();
        for row in &e[1..] {
            out = out
                .into_iter()
                .flat_map(|(p, s)| {
                    (0..c).map(move |i| {
                        let mut q = p.clone();
                        let last = *q.last().expect("non-empty");
                        q.push(i);
                        (q, s + t.pairs[last * c + i] + row[i])
                    })
                })
                .collect();
        }
        out.retain(|(_, s)| s.is_finite());
        out
    }

    fn learned(seed: u32) -> Transitions {
        let e = emissions(Tag::COUNT + 1, seed);
        Transitions::new(&e[0], &e[1..].concat())
    }

    #[test]
    fn viterbi_and_marginals_match_enumeration() {
        let t = learned(7);
        let e = emissions(3, 11);
        let all = paths(&t, &e);
        let best = all
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("some valid path");
        let decoded: Vec<usize> = t.viterbi(&e).iter().map(|t| t.index()).collect();
        assert_eq!(decoded, best.0);
        let log_z = all.iter().map(|p| p.1.exp()).sum::<f32>().ln();
        let marginals = t.log_marginals(&e);
        for (w, row) in marginals.iter().enumerate() {
            for (i, &m) in row.iter().enumerate() {
                let mass: f32 = all.iter().filter(|p| p.0[w] == i).map(|p| p.1.exp()).sum();
                let expected = mass.ln() - log_z;
                if mass == 0.0 {
                    assert_eq!(m, f32::NEG_INFINITY);
                } else {
                    assert!(
                        (m - expected).abs() < 1e-4,
                        "word {w} tag {i}: {m} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn long_texts_keep_probabilities_and_paths() {
        // Thousands of words with large scores: marginals still sum to one, and Viterbi
        // matches the path found on short pieces cut where one tag is certain.
        let t = learned(3);
        let mut e = emissions(6_000, 29);
        for row in &mut e {
            row.iter_mut().for_each(|v| *v *= 10.0);
        }
        for (w, row) in t.log_marginals(&e).iter().enumerate() {
            let total: f32 = row.iter().map(|v| v.exp()).sum();
            assert!((total - 1.0).abs() < 1e-3, "word {w}: {total}");
            assert!(row.iter().all(|v| *v <= 1e-4), "word {w}: {row:?}");
        }
        // Word 3000 is certainly `O`: the path splits there into independent halves.
        for (i, v) in e[3_000].iter_mut().enumerate() {
            *v = if i == Tag::O.index() { 1e3 } else { -1e3 };
        }
        let whole = t.viterbi(&e);
        assert_eq!(whole[3_000], Tag::O);
        let head = t.viterbi(&e[..3_001]);
        assert_eq!(&whole[..3_001], head.as_slice());
    }

    #[test]
    fn decoding_never_breaks_bio() {
        let t = Transitions::new(&[0.0; Tag::COUNT], &[0.0; Tag::COUNT * Tag::COUNT]);
        // Every word prefers I-PER: the path must start with B-PER.
        let mut e = vec![vec![-5.0; Tag::COUNT]; 3];
        for row in &mut e {
            row[Tag::I(EntityLabel::Per).index()] = 0.0;
        }
        e[0][Tag::B(EntityLabel::Per).index()] = -1.0;
        let tags = t.viterbi(&e);
        assert_eq!(tags[0], Tag::B(EntityLabel::Per));
        assert_eq!(&tags[1..], &[Tag::I(EntityLabel::Per); 2]);
    }

    #[test]
    fn training_loss_matches_enumeration_and_ignores_padding() -> Result<()> {
        let device = Device::Cpu;
        let c = Tag::COUNT;
        let learned_start = emissions(1, 3).concat();
        let learned_pairs = emissions(c, 5).concat();
        let t = Transitions::new(&learned_start, &learned_pairs);
        let e = emissions(3, 13);
        // Word 1's label allows O or B-MISC; the others are fixed.
        let gold = [Tag::B(EntityLabel::Org).index(), usize::MAX, Tag::O.index()];
        let open = [Tag::O.index(), Tag::B(EntityLabel::Misc).index()];
        let all = paths(&t, &e);
        let log_z = all.iter().map(|p| p.1.exp()).sum::<f32>().ln();
        let gold_mass: f32 = all
            .iter()
            .filter(|p| p.0[0] == gold[0] && open.contains(&p.0[1]) && p.0[2] == gold[2])
            .map(|p| p.1.exp())
            .sum();
        let expected = (log_z - gold_mass.ln()) / 3.0;

        // A batch of two: the sequence, and a one-word sequence padded to three words.
        let mut em = e.concat();
        em.extend(emissions(3, 17).concat());
        let mut allowed = vec![-1e9f32; 2 * 3 * c];
        allowed[gold[0]] = 0.0;
        for i in open {
            allowed[c + i] = 0.0;
        }
        allowed[2 * c + gold[2]] = 0.0;
        allowed[3 * c + Tag::O.index()] = 0.0;
        let (start_c, pairs_c) = training_constraints(&device)?;
        let start = (Tensor::new(learned_start.as_slice(), &device)? + start_c)?;
        let pairs = (Tensor::from_vec(learned_pairs, (c, c), &device)? + pairs_c)?;
        let loss = negative_log_likelihood(
            &Tensor::from_vec(em.clone(), (2, 3, c), &device)?,
            &Tensor::from_vec(allowed, (2, 3, c), &device)?,
            &[3, 1],
            &start,
            &pairs,
        )?
        .to_scalar::<f32>()?;
        // The one-word sequence: -log softmax(start + e)[O], over 4 words in all.
        let one: Vec<f32> = (0..c).map(|i| t.start[i] + em[3 * c + i]).collect();
        let one_z = one
            .iter()
            .filter(|v| v.is_finite())
            .map(|v| v.exp())
            .sum::<f32>()
            .ln();
        let one_loss = one_z - one[Tag::O.index()];
        let expected_batch = (expected * 3.0 + one_loss) / 4.0;
        assert!(
            (loss - expected_batch).abs() < 1e-3,
            "{loss} vs {expected_batch}"
        );
        Ok(())
    }
}
