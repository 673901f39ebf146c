//! Per-feature standardisation shared by the heads: the NER head's word rows and the theme
//! head's neighbour index (pooled window vectors) are both standardised by the mean and
//! spread of their training rows.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Per-feature standardisation of feature rows, fitted on the training rows. The encoder's
/// states have a few dimensions hundreds of times larger than the rest: without it the NER
/// MLP spends its first epochs learning to ignore them, and a neighbour search would measure
/// nearness mostly by those few.
#[derive(Debug, Clone, PartialEq)]
pub struct InputScaling {
    /// Mean per feature.
    pub mean: Vec<f32>,
    /// 1 / standard deviation per feature (0 for a constant feature).
    pub inv_std: Vec<f32>,
}

impl InputScaling {
    /// Mean and spread of each of `width` features over row-major `rows`.
    pub fn fit(rows: &[f32], width: usize) -> Self {
        Self::fit_parts([rows], width)
    }

    /// As [`InputScaling::fit`] over the rows of several parts taken together, without
    /// joining them (a corpus's features are gigabytes).
    pub fn fit_parts<'a>(parts: impl IntoIterator<Item = &'a [f32]>, width: usize) -> Self {
        let mut rows_seen = 0usize;
        let mut sum = vec![0f64; width];
        let mut sq = vec![0f64; width];
        for row in parts.into_iter().flat_map(|p| p.chunks_exact(width)) {
            rows_seen += 1;
            for ((s, q), &v) in sum.iter_mut().zip(&mut sq).zip(row) {
                *s += v as f64;
                *q += (v as f64) * (v as f64);
            }
        }
        let n = rows_seen.max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let inv_std = sum
            .iter()
            .zip(&sq)
            .map(|(s, q)| {
                let var = (q / n - (s / n) * (s / n)).max(0.0);
                if var > 1e-12 {
                    (1.0 / var.sqrt()) as f32
                } else {
                    0.0
                }
            })
            .collect();
        InputScaling { mean, inv_std }
    }

    /// Standardises row-major `rows` in place.
    pub fn apply(&self, rows: &mut [f32]) {
        for row in rows.chunks_exact_mut(self.mean.len().max(1)) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.inv_std) {
                *v = (*v - m) * s;
            }
        }
    }

    /// The scaling as tensors named `input.mean` and `input.inv_std`, for saving beside the MLP.
    ///
    /// # Errors
    /// A tensor error.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (
                "input.mean".into(),
                Tensor::from_slice(&self.mean, self.mean.len(), &Device::Cpu)?,
            ),
            (
                "input.inv_std".into(),
                Tensor::from_slice(&self.inv_std, self.inv_std.len(), &Device::Cpu)?,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::InputScaling;

    #[test]
    fn standardises_each_feature_and_zeroes_a_constant_one() {
        // Two features over three rows: [1, 5], [2, 5], [3, 5].
        let rows = [1.0, 5.0, 2.0, 5.0, 3.0, 5.0];
        let scaling = InputScaling::fit(&rows, 2);
        assert!((scaling.mean[0] - 2.0).abs() < 1e-6);
        assert!((scaling.mean[1] - 5.0).abs() < 1e-6);
        // Population spread of 1, 2, 3 is sqrt(2/3).
        assert!((scaling.inv_std[0] - (1.5f32).sqrt()).abs() < 1e-5);
        assert_eq!(scaling.inv_std[1], 0.0);
        let mut standardised = rows;
        scaling.apply(&mut standardised);
        assert!((standardised[0] + (1.5f32).sqrt()).abs() < 1e-5);
        assert_eq!(standardised[2], 0.0);
        assert!(standardised.iter().skip(1).step_by(2).all(|&v| v == 0.0));
    }

    #[test]
    fn parts_fit_like_their_rows_joined() {
        let rows = [0.5, -1.0, 2.0, 4.0, -3.0, 0.25, 7.0, 1.0];
        let whole = InputScaling::fit(&rows, 2);
        let parts = InputScaling::fit_parts([&rows[..2], &rows[2..6], &rows[6..]], 2);
        assert_eq!(whole, parts);
    }
}
