//! The neighbour vote: a second opinion on each window from the training windows nearest to it.
//!
//! The MLP head extrapolates. Far from its training texts it can give a theme that none of the
//! nearest training windows carry: a real analysis of a group's propaganda comeback scored
//! `takedown` 0.52–0.62 by every MLP head the README records, while none of the 40 training
//! windows nearest to its first window carries `takedown` (the closest are `recruitment`
//! analyses with nothing removed). The vote asks those
//! neighbours directly. Each window's `k` nearest training windows (cosine similarity in a
//! random projection of the standardised pooled vectors) vote with their texts' labels; the
//! article's vote comes by the card's aggregation rule and is blended with the MLP's raw
//! article score before calibration:
//!
//! ```text
//! raw = (1 - weight) · mlp + weight · vote
//! ```
//!
//! `train_themes` chooses `k`, the temperature and the weight on cross-validated predictions
//! inside the training split (a weight of 0 means no vote and no index file).
//!
//! The index ([`NEIGHBOUR_INDEX`]) stores each training window as `dims` signed bytes with one
//! scale, the labels of its text, and the mean and spread that standardise a pooled vector.
//! The projection is not stored: it is a matrix of ±1 drawn from `projection_seed` by
//! [`projection_signs`], integer arithmetic only, so every platform draws the same one.
//!
//! ```
//! use themescan::heads::neighbours::{NeighbourIndex, NeighbourSettings};
//!
//! let settings = NeighbourSettings { k: 1, temperature: 0.0, weight: 0.5, dims: 8, projection_seed: 1 };
//! // Two training windows of width 4, the first labelled with theme 0, the second with theme 1.
//! let rows = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
//! let index = NeighbourIndex::build(&rows, 4, &[vec![true, false], vec![false, true]], settings).unwrap();
//! let votes = index.votes(&[0.9, 0.0, 0.0, 0.1]);
//! assert_eq!(votes, vec![vec![1.0, 0.0]]);
//! ```

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};

use super::scaling::InputScaling;
use super::theme::Aggregation;
use crate::encoder::int8::gemm::Kernel;
use crate::encoder::int8::ops::wide_fn;
use crate::error::{Error, Result};

/// File in a heads folder holding the neighbour index of its theme head (written by
/// `train_themes` when the vote pays on cross-validation).
pub const NEIGHBOUR_INDEX: &str = "themes-neighbours.safetensors";

/// How the vote is made and how much it counts; recorded in the theme card.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NeighbourSettings {
    /// Training windows that vote for each window.
    pub k: usize,
    /// Votes are weighted by `exp(temperature · (similarity - best similarity))`; 0: equal.
    pub temperature: f32,
    /// Share of the vote in the blended raw article score (0 to 1).
    pub weight: f32,
    /// Width of the random projection.
    pub dims: usize,
    /// Seed of the projection's signs ([`projection_signs`]).
    pub projection_seed: u64,
}

impl NeighbourSettings {
    /// The blended raw article scores: `(1 - weight) · mlp + weight · vote`, per theme.
    pub fn blend(&self, mlp: &[f32], vote: &[f32]) -> Vec<f32> {
        mlp.iter()
            .zip(vote)
            .map(|(m, v)| (1.0 - self.weight) * m + self.weight * v)
            .collect()
    }
}

/// The ±1 entries of the `[input_size, dims]` projection (row-major) drawn from `seed` by
/// splitmix64: the same matrix on every platform, so the index need not store it.
pub fn projection_signs(input_size: usize, dims: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..input_size * dims)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            if z >> 63 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

/// A query's nearest index rows: `(cosine similarity, row)`, most similar first.
pub type Neighbours = Vec<(f32, u32)>;

/// Training windows as quantised projected vectors with their texts' labels.
#[derive(Debug, Clone)]
pub struct NeighbourIndex {
    settings: NeighbourSettings,
    input_size: usize,
    themes: usize,
    /// Standardises a pooled vector before its projection.
    scaling: InputScaling,
    projection: Vec<f32>,
    /// `[rows, dims]`: each row's unit vector times `127 / its largest entry`.
    rows: Vec<i8>,
    /// Per row: the factor back to the unit vector.
    scales: Vec<f32>,
    /// `[rows, themes]`, 0 or 1.
    labels: Vec<u8>,
    /// Which build of [`row_dots`] this CPU runs.
    kernel: Kernel,
}

impl NeighbourIndex {
    /// Builds an index over `rows` (row-major, `input_size` wide; pooled window vectors), each
    /// with its text's labels. The mean and spread that standardise a vector are those of
    /// `rows`.
    ///
    /// # Errors
    /// [`Error::Setting`] if there are no rows, if `rows` and `labels` disagree in length, or if
    /// `k` or `dims` is 0.
    pub fn build(
        rows: &[f32],
        input_size: usize,
        labels: &[Vec<bool>],
        settings: NeighbourSettings,
    ) -> Result<Self> {
        let n = labels.len();
        if n == 0 || input_size == 0 || rows.len() != n * input_size {
            return Err(Error::Setting(format!(
                "a neighbour index needs rows of width {input_size} with one label set each: \
                 {} values for {n} label sets",
                rows.len()
            )));
        }
        if settings.k == 0 || settings.dims == 0 {
            return Err(Error::Setting(format!(
                "neighbour k and dims must be above 0, found k {} and dims {}",
                settings.k, settings.dims
            )));
        }
        let themes = labels[0].len();
        if labels.iter().any(|l| l.len() != themes) {
            return Err(Error::Setting(format!(
                "every window of a neighbour index needs the same {themes} labels"
            )));
        }
        let mut index = NeighbourIndex {
            settings,
            input_size,
            themes,
            scaling: InputScaling::fit(rows, input_size),
            projection: projection_signs(input_size, settings.dims, settings.projection_seed),
            rows: Vec::new(),
            scales: Vec::new(),
            labels: labels
                .iter()
                .flat_map(|l| l.iter().map(|&b| b as u8))
                .collect(),
            kernel: Kernel::detect(),
        };
        let (quantised, scales) = index.quantise(rows);
        index.rows = quantised;
        index.scales = scales;
        Ok(index)
    }

    /// The same index voting with another `k`, temperature and weight (the stored rows depend
    /// only on `dims` and the projection seed, which stay).
    pub fn with_vote(mut self, k: usize, temperature: f32, weight: f32) -> Self {
        self.settings = NeighbourSettings {
            k,
            temperature,
            weight,
            ..self.settings
        };
        self
    }

    /// The settings it was built with.
    pub fn settings(&self) -> NeighbourSettings {
        self.settings
    }

    /// Rows in the index.
    pub fn len(&self) -> usize {
        self.scales.len()
    }

    /// Whether the index has no rows (never true for a built or loaded one).
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    /// Standardised, projected, normalised and quantised vectors of `rows`, with their scales.
    fn quantise(&self, rows: &[f32]) -> (Vec<i8>, Vec<f32>) {
        let dims = self.settings.dims;
        let n = rows.len() / self.input_size;
        let mut out = vec![0i8; n * dims];
        let mut scales = vec![0f32; n];
        let mut projected = vec![0f32; dims];
        let mut standardised = vec![0f32; self.input_size];
        for ((row, q), scale) in rows
            .chunks_exact(self.input_size)
            .zip(out.chunks_exact_mut(dims))
            .zip(&mut scales)
        {
            standardised.copy_from_slice(row);
            self.scaling.apply(&mut standardised);
            projected.fill(0.0);
            for (&z, signs) in standardised.iter().zip(self.projection.chunks_exact(dims)) {
                projected
                    .iter_mut()
                    .zip(signs)
                    .for_each(|(p, s)| *p += z * s);
            }
            let norm = projected.iter().map(|p| p * p).sum::<f32>().sqrt();
            let largest = projected.iter().fold(0f32, |m, p| m.max(p.abs()));
            if norm == 0.0 || largest == 0.0 {
                continue;
            }
            let to_bytes = 127.0 / largest;
            for (q, p) in q.iter_mut().zip(&projected) {
                *q = (p * to_bytes).round() as i8;
            }
            *scale = 1.0 / (to_bytes * norm);
        }
        (out, scales)
    }

    /// The `k` nearest index rows of each of `rows` (pooled vectors, `input_size` wide),
    /// skipping the index rows for which `skip` is true (cross-validation leaves out the held
    /// fold's windows).
    pub fn neighbours(
        &self,
        rows: &[f32],
        k: usize,
        skip: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<Neighbours> {
        let dims = self.settings.dims;
        let (queries, query_scales) = self.quantise(rows);
        // One query's dot products and candidates reuse buffers of one entry per index row.
        let one = |(dots, scored): &mut (Vec<i32>, Vec<(f32, u32)>),
                   (q, &qs): (&[i8], &f32)|
         -> Neighbours {
            row_dots(self.kernel, q, &self.rows, dots);
            scored.clear();
            scored.extend(
                dots.iter()
                    .zip(&self.scales)
                    .enumerate()
                    .filter(|(r, _)| !skip(*r))
                    .map(|(r, (&d, &rs))| (d as f32 * qs * rs, r as u32)),
            );
            let k = k.min(scored.len());
            if k == 0 {
                return Vec::new();
            }
            scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let mut nearest = scored[..k].to_vec();
            nearest.sort_by(|a, b| b.0.total_cmp(&a.0));
            nearest
        };
        let buffers = || {
            (
                vec![0i32; self.scales.len()],
                Vec::with_capacity(self.scales.len()),
            )
        };
        let pairs: Vec<(&[i8], &f32)> = queries.chunks_exact(dims).zip(&query_scales).collect();
        if pairs.len() > 16 {
            pairs.into_par_iter().map_init(buffers, one).collect()
        } else {
            let mut reused = buffers();
            pairs.into_iter().map(|p| one(&mut reused, p)).collect()
        }
    }

    /// The vote of the first `k` of `neighbours` at `temperature`: per theme, the weighted
    /// share of them whose text carries it (zeros for no neighbours).
    pub fn vote(&self, neighbours: &[(f32, u32)], k: usize, temperature: f32) -> Vec<f32> {
        let mut vote = vec![0f32; self.themes];
        let voters = &neighbours[..k.min(neighbours.len())];
        let Some(&(best, _)) = voters.first() else {
            return vote;
        };
        let mut total = 0f32;
        for &(similarity, row) in voters {
            let w = (temperature * (similarity - best)).exp();
            total += w;
            let labels = &self.labels[row as usize * self.themes..(row as usize + 1) * self.themes];
            vote.iter_mut()
                .zip(labels)
                .for_each(|(v, &l)| *v += w * l as f32);
        }
        vote.iter_mut().for_each(|v| *v /= total);
        vote
    }

    /// Each window's vote under the index's own settings, for pooled window vectors `rows`.
    pub fn votes(&self, rows: &[f32]) -> Vec<Vec<f32>> {
        let s = self.settings;
        self.neighbours(rows, s.k, &|_| false)
            .iter()
            .map(|n| self.vote(n, s.k, s.temperature))
            .collect()
    }

    /// Writes the index as safetensors (`mean`, `inv_std`, `rows` i8, `scales`, `labels` u8).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (mean, inv_std, scales) = (
            f32_bytes(&self.scaling.mean),
            f32_bytes(&self.scaling.inv_std),
            f32_bytes(&self.scales),
        );
        let rows: Vec<u8> = self.rows.iter().map(|&b| b as u8).collect();
        let n = self.len();
        fn view<'a>(
            path: &Path,
            dtype: Dtype,
            shape: Vec<usize>,
            data: &'a [u8],
        ) -> Result<TensorView<'a>> {
            TensorView::new(dtype, shape, data).map_err(|e| Error::Tensor {
                name: path.display().to_string(),
                message: e.to_string(),
            })
        }
        let tensors = vec![
            (
                "mean",
                view(path, Dtype::F32, vec![self.input_size], &mean)?,
            ),
            (
                "inv_std",
                view(path, Dtype::F32, vec![self.input_size], &inv_std)?,
            ),
            (
                "rows",
                view(path, Dtype::I8, vec![n, self.settings.dims], &rows)?,
            ),
            ("scales", view(path, Dtype::F32, vec![n], &scales)?),
            (
                "labels",
                view(path, Dtype::U8, vec![n, self.themes], &self.labels)?,
            ),
        ];
        let bytes = safetensors::serialize(tensors, None).map_err(|e| Error::Tensor {
            name: path.display().to_string(),
            message: e.to_string(),
        })?;
        std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
    }

    /// Reads the index of a heads folder whose card asks for one, checking it against the
    /// card's input width, theme count and settings.
    ///
    /// # Errors
    /// [`Error::ModelFolder`] if the file is missing, [`Error::Tensor`] if it is not valid
    /// safetensors or a tensor is missing or misshapen.
    pub fn from_folder(
        folder: &Path,
        input_size: usize,
        themes: usize,
        settings: NeighbourSettings,
    ) -> Result<Self> {
        let path = folder.join(NEIGHBOUR_INDEX);
        if !path.is_file() {
            return Err(Error::ModelFolder {
                path: folder.to_path_buf(),
                message: format!(
                    "no `{NEIGHBOUR_INDEX}`, which themes.json's `neighbours` asks for: copy it \
                     with the head, or train the head again with `cargo run --release --example \
                     train_themes`"
                ),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |message: String| Error::Tensor {
            name: path.display().to_string(),
            message,
        };
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let mut found: HashMap<&str, (Dtype, Vec<usize>, &[u8])> = HashMap::new();
        for name in ["mean", "inv_std", "rows", "scales", "labels"] {
            let t = file
                .tensor(name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            found.insert(name, (t.dtype(), t.shape().to_vec(), t.data()));
        }
        let rows_n = found["scales"].1.first().copied().unwrap_or(0);
        let expect = [
            ("mean", Dtype::F32, vec![input_size]),
            ("inv_std", Dtype::F32, vec![input_size]),
            ("rows", Dtype::I8, vec![rows_n, settings.dims]),
            ("scales", Dtype::F32, vec![rows_n]),
            ("labels", Dtype::U8, vec![rows_n, themes]),
        ];
        for (name, dtype, shape) in &expect {
            let (d, s, _) = &found[name];
            if d != dtype || s != shape {
                return Err(bad(format!(
                    "`{name}` is {d:?} {s:?}, the card asks for {dtype:?} {shape:?}"
                )));
            }
        }
        if rows_n == 0 {
            return Err(bad("the index has no rows".into()));
        }
        let floats = |name: &str| -> Vec<f32> {
            found[name]
                .2
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        Ok(NeighbourIndex {
            settings,
            input_size,
            themes,
            scaling: InputScaling {
                mean: floats("mean"),
                inv_std: floats("inv_std"),
            },
            projection: projection_signs(input_size, settings.dims, settings.projection_seed),
            rows: found["rows"].2.iter().map(|&b| b as i8).collect(),
            scales: floats("scales"),
            labels: found["labels"].2.to_vec(),
            kernel: Kernel::detect(),
        })
    }
}

/// An article's neighbour vote from its windows' votes: by the card's window rule, or the mean
/// of the two best windows when the rule scores the mean vector (a vote has no vector).
pub fn article_vote(rule: Aggregation, votes: &[Vec<f32>], themes: usize) -> Vec<f32> {
    if votes.is_empty() {
        return vec![0.0; themes];
    }
    rule.combine(votes)
        .or_else(|| Aggregation::TopTwoMean.combine(votes))
        .expect("a rule over window scores")
}

wide_fn! {
    /// Each `query.len()`-wide row of `rows` dotted with `query`, into `out`: the byte sums the
    /// cosines come from, built for AVX-512 where the CPU has it (a vote over 8,495 rows went
    /// from 0.51 to 0.18 ms per window with it; see the `analysis` bench).
    fn row_dots(kernel: Kernel, query: &[i8], rows: &[i8], out: &mut [i32]) {
        const LANES: usize = 32;
        let dims = query.len();
        for (row, o) in rows.chunks_exact(dims).zip(out.iter_mut()) {
            let mut acc = [0i32; LANES];
            for (q, r) in query.chunks_exact(LANES).zip(row.chunks_exact(LANES)) {
                for j in 0..LANES {
                    acc[j] += q[j] as i32 * r[j] as i32;
                }
            }
            let done = dims - dims % LANES;
            let rest: i32 = query[done..]
                .iter()
                .zip(&row[done..])
                .map(|(&x, &y)| x as i32 * y as i32)
                .sum();
            *o = acc.iter().sum::<i32>() + rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(k: usize) -> NeighbourSettings {
        NeighbourSettings {
            k,
            temperature: 0.0,
            weight: 0.3,
            dims: 64,
            projection_seed: 7,
        }
    }

    /// Three clusters of training windows around different directions, labelled by cluster.
    fn clusters() -> (Vec<f32>, Vec<Vec<bool>>) {
        let width = 16;
        let (mut rows, mut labels) = (Vec::new(), Vec::new());
        for c in 0..3 {
            for j in 0..5 {
                let mut row = vec![0.01 * j as f32; width];
                row[c * 4] = 1.0;
                row[c * 4 + 1] = 0.5;
                rows.extend(row);
                labels.push((0..3).map(|t| t == c).collect());
            }
        }
        (rows, labels)
    }

    #[test]
    fn a_window_gets_the_labels_of_its_cluster() {
        let (rows, labels) = clusters();
        let index = NeighbourIndex::build(&rows, 16, &labels, settings(5)).unwrap();
        let mut query = vec![0.02f32; 16];
        query[8] = 0.9;
        query[9] = 0.6;
        assert_eq!(index.votes(&query), vec![vec![0.0, 0.0, 1.0]]);
        // Skipping the whole cluster leaves only other clusters to vote.
        let near = index.neighbours(&query, 5, &|r| (10..15).contains(&r));
        assert!(near[0].iter().all(|&(_, r)| !(10..15).contains(&r)));
        assert_eq!(index.vote(&near[0], 5, 0.0)[2], 0.0);
        // Similarities are cosines, best first.
        let all = index.neighbours(&query, 15, &|_| false);
        assert!(all[0].windows(2).all(|w| w[0].0 >= w[1].0));
        assert!(all[0][0].0 <= 1.01 && all[0][0].0 > 0.5);
    }

    #[test]
    fn a_saved_index_reads_back_and_a_wrong_card_is_refused() {
        let (rows, labels) = clusters();
        let index = NeighbourIndex::build(&rows, 16, &labels, settings(3)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        index.save(&dir.path().join(NEIGHBOUR_INDEX)).unwrap();
        let back = NeighbourIndex::from_folder(dir.path(), 16, 3, settings(3)).unwrap();
        assert_eq!(back.len(), 15);
        let query = &rows[16 * 6..16 * 7];
        assert_eq!(back.votes(query), index.votes(query));
        let wrong = NeighbourIndex::from_folder(dir.path(), 16, 4, settings(3)).unwrap_err();
        assert!(wrong.to_string().contains("labels"), "{wrong}");
        let missing = NeighbourIndex::from_folder(&dir.path().join("none"), 16, 3, settings(3));
        assert!(matches!(missing, Err(Error::ModelFolder { .. })));
        std::fs::write(dir.path().join(NEIGHBOUR_INDEX), b"not safetensors").unwrap();
        let torn = NeighbourIndex::from_folder(dir.path(), 16, 3, settings(3)).unwrap_err();
        assert!(torn.to_string().contains("safetensors"), "{torn}");
    }

    #[test]
    fn both_builds_of_the_byte_dots_agree_with_plain_sums() {
        let dims = 70; // two full lanes of 32 and a remainder
        let mut state = 12345u32;
        let mut byte = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (state >> 16) as i8
        };
        let query: Vec<i8> = (0..dims).map(|_| byte()).collect();
        let rows: Vec<i8> = (0..dims * 9).map(|_| byte()).collect();
        let plain: Vec<i32> = rows
            .chunks_exact(dims)
            .map(|r| {
                r.iter()
                    .zip(&query)
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum()
            })
            .collect();
        for kernel in [Kernel::Portable, Kernel::detect()] {
            let mut out = vec![0i32; 9];
            row_dots(kernel, &query, &rows, &mut out);
            assert_eq!(out, plain, "{kernel:?}");
        }
    }

    #[test]
    fn temperature_favours_the_nearest_and_blend_mixes() {
        let (rows, labels) = clusters();
        let index = NeighbourIndex::build(&rows, 16, &labels, settings(15)).unwrap();
        let query = &rows[0..16];
        let near = index.neighbours(query, 15, &|_| false);
        let flat = index.vote(&near[0], 15, 0.0);
        let sharp = index.vote(&near[0], 15, 50.0);
        assert!((flat[0] - 5.0 / 15.0).abs() < 1e-6);
        assert!(sharp[0] > 0.9);
        let s = settings(3);
        assert_eq!(s.blend(&[1.0, 0.0], &[0.0, 1.0]), vec![0.7, 0.3]);
        // splitmix64's signs, pinned (computed independently): an index stores no projection,
        // so a change here would silently break every index written before it.
        assert_eq!(
            projection_signs(4, 3, 9),
            [-1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0, 1.0]
        );
        assert!(NeighbourIndex::build(&[], 16, &[], s).is_err());
        let ragged = [vec![true, false], vec![true]];
        assert!(NeighbourIndex::build(&[0.0; 4], 2, &ragged, s).is_err());
    }
}
