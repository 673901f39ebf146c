//! Per-feature standardisation shared by the heads: the NER head's word rows and the theme
//! head's neighbour index both standardise the encoder's pooled states by the training rows'
//! mean and spread.

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
