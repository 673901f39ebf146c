//! The transformer forward pass: candle's kernels on any [`candle_core::Device`], or the int8
//! CPU path ([`int8`]).
//!
//! [`Encoder::forward`] takes a [`Batch`] of plain token ids and gives [`EncoderOutput`]: the
//! per-token states of every row, left where the path made them (padded tensors on the device,
//! or packed host rows) and read per row on the host. The encoder knows nothing of where its
//! weights came from (see [`crate::weights`]) or what the heads do with its output.

mod config;
pub mod int8;
pub mod layers;
pub mod trainable;

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use ndarray::Array2;

pub use config::{EncoderConfig, HiddenAct};
use int8::gemm::Kernel;
use int8::Int8Encoder;
use layers::{Embeddings, Layer};

use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// Which code runs the encoder on a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuPath {
    /// [`CpuPath::Int8`] on CPUs with AVX-512 VNNI, else [`CpuPath::Reference`]. The default.
    #[default]
    Auto,
    /// Int8 matrix products over packed sequences ([`int8`]): with AVX-512 VNNI where the CPU
    /// has it, else in portable Rust (same results, much slower; for tests on any CPU).
    Int8,
    /// The int8 path in portable Rust even where the CPU has VNNI: the same integer products
    /// as [`CpuPath::Int8`] and f32 attention. For tests and kernel comparisons.
    Int8Portable,
    /// candle's kernels over the weights as stored (f32, or Q4_0 through `QMatMul`): the
    /// reference the int8 path is measured against.
    Reference,
}

impl std::str::FromStr for CpuPath {
    type Err = Error;

    /// `auto`, `int8`, `int8-portable` or `reference`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(CpuPath::Auto),
            "int8" => Ok(CpuPath::Int8),
            "int8-portable" => Ok(CpuPath::Int8Portable),
            "reference" => Ok(CpuPath::Reference),
            other => Err(Error::Setting(format!(
                "unknown CPU path `{other}`: expected auto, int8, int8-portable or reference"
            ))),
        }
    }
}

impl CpuPath {
    /// What this setting runs on this CPU: [`CpuPath::Auto`] becomes [`CpuPath::Int8`] or
    /// [`CpuPath::Reference`], and [`CpuPath::Int8`] becomes [`CpuPath::Int8Portable`] where
    /// the CPU lacks AVX-512 VNNI. Results differ slightly between paths, so caches of
    /// encoder outputs should be keyed by this.
    ///
    /// # Example
    /// ```
    /// use themescan::CpuPath;
    /// assert_ne!(CpuPath::Auto.resolve(), CpuPath::Auto);
    /// assert_eq!(CpuPath::Reference.resolve(), CpuPath::Reference);
    /// ```
    pub fn resolve(self) -> CpuPath {
        let vnni = Kernel::detect() == Kernel::Vnni;
        match self {
            CpuPath::Auto if vnni => CpuPath::Int8,
            CpuPath::Auto => CpuPath::Reference,
            CpuPath::Int8 if !vnni => CpuPath::Int8Portable,
            other => other,
        }
    }
}

/// A BERT-family encoder (BERT, XLM-RoBERTa, multilingual-e5).
#[derive(Debug, Clone)]
pub struct Encoder {
    compute: Compute,
    config: EncoderConfig,
    device: Device,
    dtype: DType,
}

#[derive(Debug, Clone)]
enum Compute {
    Candle {
        embeddings: Embeddings,
        layers: Vec<Layer>,
    },
    Int8(Int8Encoder),
}

/// What one forward pass gives: per-token states of every row, where the path left them.
///
/// The reference path leaves padded tensors on its device; the int8 path leaves the rows'
/// real tokens packed in host memory, so reading them costs no padding, no tensor ops and no
/// device copy. Both are read the same way: [`EncoderOutput::row_means`],
/// [`EncoderOutput::hidden_rows`], [`EncoderOutput::layer_mean_rows`].
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    states: States,
}

#[derive(Debug, Clone)]
enum States {
    /// `hidden` and `layer_mean` `[rows, len, hidden]` (padded positions hold garbage), `mask`
    /// `[rows, len]` with 1 for real tokens, in the activation dtype.
    Device {
        hidden: Tensor,
        mask: Tensor,
        layer_mean: Option<Tensor>,
    },
    /// Real tokens only, row after row: `[Σ lengths, hidden]`.
    Host {
        hidden: Vec<f32>,
        layer_mean: Option<Vec<f32>>,
        lengths: Vec<usize>,
        width: usize,
    },
}

impl EncoderOutput {
    /// Mean of each row's real-token last-layer states (not normalised), one `Vec` per row.
    ///
    /// # Errors
    /// A tensor error on the reference path.
    pub fn row_means(&self) -> Result<Vec<Vec<f32>>> {
        match &self.states {
            States::Device { hidden, mask, .. } => Ok(layers::mean_pool(hidden, mask)?
                .to_dtype(DType::F32)?
                .to_vec2()?),
            States::Host {
                hidden,
                lengths,
                width,
                ..
            } => {
                let mut start = 0;
                Ok(lengths
                    .iter()
                    .map(|&n| {
                        let mut mean = vec![0f32; *width];
                        for row in hidden[start * width..(start + n) * width].chunks_exact(*width) {
                            for (m, v) in mean.iter_mut().zip(row) {
                                *m += v;
                            }
                        }
                        start += n;
                        let inv = 1.0 / n.max(1) as f32;
                        mean.iter_mut().for_each(|m| *m *= inv);
                        mean
                    })
                    .collect())
            }
        }
    }

    /// Each row's real-token last-layer states, `[length, hidden]` per row, on the host.
    ///
    /// # Errors
    /// A tensor error on the reference path.
    pub fn hidden_rows(&self, lengths: &[usize]) -> Result<Vec<Array2<f32>>> {
        match &self.states {
            States::Device { hidden, .. } => padded_rows(hidden, lengths),
            States::Host { hidden, width, .. } => Ok(packed_rows(hidden, lengths, *width)),
        }
    }

    /// As [`EncoderOutput::hidden_rows`] for the mean of the layers
    /// [`Encoder::forward_with_layer_mean`] asked for (`None` if none). Token-level heads read it: lower
    /// layers keep more of a token's surface form than the last, which is shaped by pre-training.
    ///
    /// # Errors
    /// A tensor error on the reference path.
    pub fn layer_mean_rows(&self, lengths: &[usize]) -> Result<Option<Vec<Array2<f32>>>> {
        match &self.states {
            States::Device { layer_mean, .. } => layer_mean
                .as_ref()
                .map(|m| padded_rows(m, lengths))
                .transpose(),
            States::Host {
                layer_mean, width, ..
            } => Ok(layer_mean.as_ref().map(|m| packed_rows(m, lengths, *width))),
        }
    }
}

/// A padded `[rows, len, hidden]` tensor → one `[length, hidden]` array per row, padding
/// dropped: one device-to-host copy.
fn padded_rows(states: &Tensor, lengths: &[usize]) -> Result<Vec<Array2<f32>>> {
    let (_, len, h) = states.dims3()?;
    let flat: Vec<f32> = states.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(flat
        .chunks(len * h)
        .zip(lengths)
        .map(|(row, &n)| {
            Array2::from_shape_vec((n, h), row[..n * h].to_vec()).expect("n rows of width h")
        })
        .collect())
}

/// Packed `[Σ lengths, hidden]` rows → one `[length, hidden]` array per row.
fn packed_rows(packed: &[f32], lengths: &[usize], h: usize) -> Vec<Array2<f32>> {
    let mut start = 0;
    lengths
        .iter()
        .map(|&n| {
            let rows = packed[start * h..(start + n) * h].to_vec();
            start += n;
            Array2::from_shape_vec((n, h), rows).expect("n rows of width h")
        })
        .collect()
}

impl Encoder {
    /// Builds the encoder from a loaded checkpoint, on the [`CpuPath::Auto`] path.
    ///
    /// # Errors
    /// [`Error::Tensor`] naming the first missing or misshapen tensor.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        Self::load_with(checkpoint, CpuPath::Auto)
    }

    /// Builds the encoder from a loaded checkpoint. `cpu_path` applies to f32 checkpoints on
    /// the CPU; other devices and dtypes always run candle's kernels.
    ///
    /// # Errors
    /// [`Error::Tensor`] naming the first missing or misshapen tensor; [`Error::Setting`] if
    /// [`CpuPath::Int8`] is asked for a model whose activation that path lacks.
    pub fn load_with(checkpoint: &Checkpoint, cpu_path: CpuPath) -> Result<Self> {
        let w = checkpoint.root();
        let cfg = checkpoint.config().clone();
        let on_cpu_f32 = checkpoint.device().is_cpu() && checkpoint.dtype() == DType::F32;
        let cpu_path = match cpu_path {
            // The int8 path implements exact GELU only; `Auto` never fails on it.
            CpuPath::Auto if cfg.hidden_act != HiddenAct::Gelu => CpuPath::Reference,
            other => other.resolve(),
        };
        let kernel = match cpu_path {
            CpuPath::Int8 if on_cpu_f32 => Some(Kernel::Vnni),
            CpuPath::Int8Portable if on_cpu_f32 => Some(Kernel::Portable),
            _ => None,
        };
        let compute = match kernel {
            Some(kernel) => Compute::Int8(Int8Encoder::load(&w, &cfg, kernel)?),
            None => Compute::Candle {
                embeddings: Embeddings::load(&w.pp("embeddings"), &cfg)?,
                layers: (0..cfg.num_hidden_layers)
                    .map(|i| Layer::load(&w.pp("encoder").pp("layer").pp(i), &cfg))
                    .collect::<Result<Vec<_>>>()?,
            },
        };
        Ok(Encoder {
            compute,
            config: cfg,
            device: checkpoint.device().clone(),
            dtype: checkpoint.dtype(),
        })
    }

    /// The encoder's sizes.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// The path this encoder runs: never [`CpuPath::Auto`].
    pub fn cpu_path(&self) -> CpuPath {
        match &self.compute {
            Compute::Int8(e) if e.kernel() == Kernel::Vnni => CpuPath::Int8,
            Compute::Int8(_) => CpuPath::Int8Portable,
            Compute::Candle { .. } => CpuPath::Reference,
        }
    }

    /// What runs the encoder, for logs: `int8 (AVX-512 VNNI), attention bf16`, or the
    /// reference path's device and dtype.
    pub fn describe(&self) -> String {
        match &self.compute {
            Compute::Int8(encoder) => encoder.describe(),
            Compute::Candle { .. } => format!(
                "reference (candle, {:?}, {})",
                self.dtype,
                if self.device.is_cpu() { "cpu" } else { "gpu" }
            ),
        }
    }

    /// Device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the encoder over a padded batch.
    ///
    /// # Errors
    /// [`Error::Setting`] if the batch is longer than the position table allows; a tensor error
    /// for an id outside the vocabulary.
    pub fn forward(&self, batch: &Batch) -> Result<EncoderOutput> {
        self.forward_with_layer_mean(batch, 0..0)
    }

    /// As [`Encoder::forward`], and also the mean of the outputs of the layers `mean_of`
    /// (0-based; `8..12` is the last four of twelve) in [`EncoderOutput::layer_mean_rows`]
    /// (`None` for an empty range; the range is cut at the layer count).
    ///
    /// # Errors
    /// As [`Encoder::forward`].
    pub fn forward_with_layer_mean(
        &self,
        batch: &Batch,
        mean_of: Range<usize>,
    ) -> Result<EncoderOutput> {
        let (rows, len) = (batch.rows(), batch.max_len());
        if len > self.config.max_sequence_len() {
            return Err(Error::Setting(format!(
                "a sequence of {len} tokens exceeds the encoder's limit of {}",
                self.config.max_sequence_len()
            )));
        }
        let n = self.config.num_hidden_layers;
        let mean_of = mean_of.start.min(n)..mean_of.end.min(n);
        let (embeddings, layers) = match &self.compute {
            Compute::Int8(encoder) => return self.forward_int8(encoder, batch, mean_of),
            Compute::Candle { embeddings, layers } => (embeddings, layers),
        };
        let mask =
            Tensor::from_vec(batch.mask(), (rows, len), &self.device)?.to_dtype(self.dtype)?;
        let bias = layers::attention_bias(&mask, self.dtype)?;
        let mut hidden = embeddings.forward(batch.ids(), rows, len)?;
        let mut sum: Option<Tensor> = None;
        for (i, layer) in layers.iter().enumerate() {
            hidden = layer.forward(&hidden, &bias)?;
            if mean_of.contains(&i) {
                sum = Some(match sum {
                    None => hidden.clone(),
                    Some(s) => (s + &hidden)?,
                });
            }
        }
        let layer_mean = sum.map(|s| s / mean_of.len() as f64).transpose()?;
        Ok(EncoderOutput {
            states: States::Device {
                hidden,
                mask,
                layer_mean,
            },
        })
    }

    /// The int8 path on the batch's unpadded rows; the states stay packed on the host.
    fn forward_int8(
        &self,
        encoder: &Int8Encoder,
        batch: &Batch,
        mean_of: Range<usize>,
    ) -> Result<EncoderOutput> {
        let len = batch.max_len();
        let mut ids = Vec::with_capacity(batch.lengths().iter().sum());
        for (row, &n) in batch.ids().chunks(len.max(1)).zip(batch.lengths()) {
            ids.extend_from_slice(&row[..n]);
        }
        let states = encoder.forward(&ids, batch.lengths(), mean_of)?;
        Ok(EncoderOutput {
            states: States::Host {
                hidden: states.hidden,
                layer_mean: states.layer_mean,
                lengths: batch.lengths().to_vec(),
                width: self.config.hidden_size,
            },
        })
    }
}
