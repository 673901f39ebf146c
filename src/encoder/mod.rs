//! The transformer forward pass on a candle [`Device`](candle_core::Device).
//!
//! [`Encoder::forward`] takes a [`Batch`] of plain token ids and gives [`EncoderOutput`]:
//! per-token hidden states `[rows, len, hidden]` and the padding mask, both on the device. The
//! encoder knows nothing of where its weights came from (see [`crate::weights`]) or what the
//! heads do with its output.

mod config;
pub mod layers;

use candle_core::{DType, Device, Tensor};

pub use config::{EncoderConfig, HiddenAct};
use layers::{Embeddings, Layer};

use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// A BERT-family encoder (BERT, XLM-RoBERTa, multilingual-e5).
#[derive(Debug, Clone)]
pub struct Encoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    config: EncoderConfig,
    device: Device,
    dtype: DType,
}

/// What one forward pass gives.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Hidden states of the last layer, `[rows, len, hidden]`; padded positions hold garbage.
    pub hidden: Tensor,
    /// 1 for real tokens, 0 for padding, `[rows, len]`, in the activation dtype.
    pub mask: Tensor,
    /// Mean of the last `k` layers' outputs, `[rows, len, hidden]`, when
    /// [`Encoder::forward_with_layer_mean`] asked for `k > 1`. Token-level heads read it: lower
    /// layers keep more of a token's surface form than the last, which is shaped by pre-training.
    pub layer_mean: Option<Tensor>,
}

impl EncoderOutput {
    /// Mean of each row's real-token states, `[rows, hidden]` (not normalised).
    pub fn mean_pooled(&self) -> Result<Tensor> {
        layers::mean_pool(&self.hidden, &self.mask)
    }
}

impl Encoder {
    /// Builds the encoder from a loaded checkpoint.
    ///
    /// # Errors
    /// [`Error::Tensor`] naming the first missing or misshapen tensor.
    pub fn load(checkpoint: &Checkpoint) -> Result<Self> {
        let w = checkpoint.root();
        let cfg = checkpoint.config().clone();
        let embeddings = Embeddings::load(&w.pp("embeddings"), &cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(&w.pp("encoder").pp("layer").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            embeddings,
            layers,
            config: cfg,
            device: checkpoint.device().clone(),
            dtype: checkpoint.dtype(),
        })
    }

    /// The encoder's sizes.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
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
        self.forward_with_layer_mean(batch, 1)
    }

    /// As [`Encoder::forward`], and also the mean of the last `k` layers' outputs in
    /// [`EncoderOutput::layer_mean`] (`None` for `k <= 1`; `k` is capped at the layer count).
    ///
    /// # Errors
    /// As [`Encoder::forward`].
    pub fn forward_with_layer_mean(&self, batch: &Batch, k: usize) -> Result<EncoderOutput> {
        let (rows, len) = (batch.rows(), batch.max_len());
        if len > self.config.max_sequence_len() {
            return Err(Error::Setting(format!(
                "a sequence of {len} tokens exceeds the encoder's limit of {}",
                self.config.max_sequence_len()
            )));
        }
        let mask =
            Tensor::from_vec(batch.mask(), (rows, len), &self.device)?.to_dtype(self.dtype)?;
        let bias = layers::attention_bias(&mask, self.dtype)?;
        let mut hidden = self.embeddings.forward(batch.ids(), rows, len)?;
        let k = k.min(self.layers.len());
        let first_summed = self.layers.len() - k;
        let mut sum: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            hidden = layer.forward(&hidden, &bias)?;
            if k > 1 && i >= first_summed {
                sum = Some(match sum {
                    None => hidden.clone(),
                    Some(s) => (s + &hidden)?,
                });
            }
        }
        let layer_mean = sum.map(|s| s / k as f64).transpose()?;
        Ok(EncoderOutput {
            hidden,
            mask,
            layer_mean,
        })
    }
}
