//! The layers of a BERT encoder, one plain struct each: built by `load(weights, cfg)`, run by
//! `forward`. Linear layers are quantised (Q4_0 through candle's `QMatMul`) or dense, decided
//! by how the checkpoint stores them.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor, D};

use super::config::{EncoderConfig, HiddenAct};
use crate::error::{Error, Result};
use crate::weights::{EmbeddingTable, MatrixWeight, Weights};

/// Which kernels a forward pass uses: candle's fused layer norm and softmax have no backward
/// pass, so training composes them from differentiable ops (same values, slower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ops {
    Fused,
    Differentiable,
}

/// A linear layer `y = x Wᵀ + b` over the last dimension.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense weight `[out, in]`.
    Dense {
        /// Weight `[out, in]`.
        weight: Tensor,
        /// Bias `[out]`.
        bias: Tensor,
    },
    /// Q4_0 weight; activations are quantised to Q8_0 blocks inside the matmul.
    Quantized {
        /// Weight as candle's quantised matmul.
        weight: QMatMul,
        /// Bias `[out]`.
        bias: Tensor,
    },
}

impl Linear {
    /// Loads `weight` and `bias` under `w`.
    ///
    /// # Errors
    /// [`Error::Tensor`] if a tensor is missing or misshapen.
    pub fn load(w: &Weights<'_>, in_dim: usize, out_dim: usize) -> Result<Self> {
        let bias = w.tensor("bias", &[out_dim])?;
        Ok(match w.matrix("weight", out_dim, in_dim)? {
            MatrixWeight::Dense(weight) => Linear::Dense { weight, bias },
            MatrixWeight::Quantized(q) => Linear::Quantized {
                weight: QMatMul::from_qtensor(q)?,
                bias,
            },
        })
    }

    /// Applies the layer to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Linear::Dense { weight, bias } => {
                // One 2-D GEMM over all rows: cheaper than a broadcast batched matmul.
                let dims = x.dims();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let y = x
                    .reshape((rows, dims[dims.len() - 1]))?
                    .matmul(&weight.t()?)?;
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("x has at least one dimension") = weight.dim(0)?;
                (y.reshape(out_dims)?, bias)
            }
            Linear::Quantized { weight, bias } => (weight.forward(x)?, bias),
        };
        Ok(y.broadcast_add(bias)?)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Loads `weight` and `bias` under `w`.
    ///
    /// # Errors
    /// [`Error::Tensor`] if a tensor is missing or misshapen.
    pub fn load(w: &Weights<'_>, size: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.tensor("weight", &[size])?,
            bias: w.tensor("bias", &[size])?,
            eps: eps as f32,
        })
    }

    /// Normalises `x` (contiguous) over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Ops::Fused)
    }

    fn forward_with(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match ops {
            Ops::Fused => candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)?,
            Ops::Differentiable => {
                candle_nn::ops::layer_norm_slow(&x, &self.weight, &self.bias, self.eps)?
            }
        })
    }
}

/// Word + position + token-type embeddings, then layer norm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    word: EmbeddingTable,
    position: Tensor,
    token_type: Tensor,
    layer_norm: LayerNorm,
    position_offset: usize,
    hidden: usize,
}

impl Embeddings {
    /// Loads the `embeddings` block.
    ///
    /// # Errors
    /// [`Error::Tensor`] if a tensor is missing or misshapen.
    pub fn load(w: &Weights<'_>, cfg: &EncoderConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let token_types = w.tensor("token_type_embeddings.weight", &[cfg.type_vocab_size, h])?;
        Ok(Embeddings {
            word: w.embedding_table("word_embeddings.weight", cfg.vocab_size, h)?,
            position: w.tensor(
                "position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
            )?,
            // Every sequence is segment 0.
            token_type: token_types.get(0)?,
            layer_norm: LayerNorm::load(&w.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            position_offset: cfg.position_offset,
            hidden: h,
        })
    }

    /// Embeds `ids` (row-major `[rows, len]`, host memory) into `[rows, len, hidden]`.
    ///
    /// # Errors
    /// [`Error::Tensor`] for a token id outside the vocabulary.
    pub fn forward(&self, ids: &[u32], rows: usize, len: usize) -> Result<Tensor> {
        let device = self.position.device();
        let dtype = self.position.dtype();
        let words = match &self.word {
            EmbeddingTable::Dense(table) => {
                if let Some(&bad) = ids
                    .iter()
                    .find(|&&id| id as usize >= table.dim(0).unwrap_or(0))
                {
                    return Err(Error::Tensor {
                        name: "embeddings.word_embeddings.weight".into(),
                        message: format!(
                            "token id {bad} is outside the vocabulary of {} rows",
                            table.dim(0)?
                        ),
                    });
                }
                let ids = Tensor::from_slice(ids, ids.len(), device)?;
                table.index_select(&ids, 0)?
            }
            EmbeddingTable::Q4Rows(table) => {
                Tensor::from_vec(table.gather(ids)?, (ids.len(), self.hidden), device)?
                    .to_dtype(dtype)?
            }
        };
        let words = words.reshape((rows, len, self.hidden))?;
        let positions = self.position.narrow(0, self.position_offset, len)?;
        let x = words
            .broadcast_add(&positions)?
            .broadcast_add(&self.token_type)?;
        self.layer_norm.forward(&x)
    }
}

/// Multi-head self-attention with its output projection, residual and layer norm.
#[derive(Debug, Clone)]
pub struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads an `attention` block.
    ///
    /// # Errors
    /// [`Error::Tensor`] if a tensor is missing or misshapen.
    pub fn load(w: &Weights<'_>, cfg: &EncoderConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let s = w.pp("self");
        Ok(Attention {
            query: Linear::load(&s.pp("query"), h, h)?,
            key: Linear::load(&s.pp("key"), h, h)?,
            value: Linear::load(&s.pp("value"), h, h)?,
            output: Linear::load(&w.pp("output").pp("dense"), h, h)?,
            layer_norm: LayerNorm::load(&w.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x`: `[rows, len, hidden]`; `bias`: `[rows, 1, 1, len]`, 0 for real keys and a large
    /// negative value for padding.
    pub fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        self.forward_with(x, bias, Ops::Fused)
    }

    fn forward_with(&self, x: &Tensor, bias: &Tensor, ops: Ops) -> Result<Tensor> {
        let (rows, len, hidden) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((rows, len, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = split((self.query.forward(x)? * scale)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = match ops {
            Ops::Fused => candle_nn::ops::softmax_last_dim(&scores)?,
            Ops::Differentiable => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((rows, len, hidden))?;
        let out = self.output.forward(&context)?;
        self.layer_norm.forward_with(&(out + x)?, ops)
    }
}

/// The feed-forward block: intermediate projection, activation, output projection, residual and
/// layer norm.
#[derive(Debug, Clone)]
pub struct FeedForward {
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    act: HiddenAct,
}

impl FeedForward {
    /// Loads `intermediate` and `output` under one `encoder.layer.N`.
    ///
    /// # Errors
    /// [`Error::Tensor`] if a tensor is missing or misshapen.
    pub fn load(w: &Weights<'_>, cfg: &EncoderConfig) -> Result<Self> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(FeedForward {
            intermediate: Linear::load(&w.pp("intermediate").pp("dense"), h, ff)?,
            output: Linear::load(&w.pp("output").pp("dense"), ff, h)?,
            layer_norm: LayerNorm::load(&w.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act: cfg.hidden_act,
        })
    }

    /// `x`: `[rows, len, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Ops::Fused)
    }

    fn forward_with(&self, x: &Tensor, ops: Ops) -> Result<Tensor> {
        let mid = self.intermediate.forward(x)?;
        let mid = match self.act {
            HiddenAct::Gelu => mid.gelu_erf()?,
            HiddenAct::GeluTanh => mid.gelu()?,
            HiddenAct::Relu => mid.relu()?,
        };
        let out = self.output.forward(&mid)?;
        self.layer_norm.forward_with(&(out + x)?, ops)
    }
}

/// One transformer layer: attention, then feed-forward.
#[derive(Debug, Clone)]
pub struct Layer {
    attention: Attention,
    feed_forward: FeedForward,
}

impl Layer {
    /// Loads `encoder.layer.N`.
    ///
    /// # Errors
    /// [`Error::Tensor`] if a tensor is missing or misshapen.
    pub fn load(w: &Weights<'_>, cfg: &EncoderConfig) -> Result<Self> {
        Ok(Layer {
            attention: Attention::load(&w.pp("attention"), cfg)?,
            feed_forward: FeedForward::load(w, cfg)?,
        })
    }

    /// `x`: `[rows, len, hidden]`; `bias` as in [`Attention::forward`].
    pub fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        self.feed_forward.forward(&self.attention.forward(x, bias)?)
    }

    /// As [`Layer::forward`], built only from ops with a backward pass, so gradients reach
    /// weights loaded as [`candle_core::Var`]s (fine-tuning; see
    /// `Checkpoint::replace_tensors`).
    pub fn forward_differentiable(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let ops = Ops::Differentiable;
        self.feed_forward
            .forward_with(&self.attention.forward_with(x, bias, ops)?, ops)
    }
}

/// The additive attention bias `[rows, 1, 1, len]` for a padded batch: made once per batch and
/// shared by every layer.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (rows, len) = mask.dims2()?;
    // Large enough to zero a padded key after softmax, small enough not to overflow the dtype.
    let negative = match dtype {
        DType::F16 => -65504.0,
        _ => f32::MIN as f64,
    };
    let bias = ((mask.to_dtype(DType::F32)? - 1.0)?.abs()? * negative)?;
    Ok(bias.to_dtype(dtype)?.reshape((rows, 1, 1, len))?)
}

/// Mean of the hidden states of the real (unpadded) tokens of each row: `[rows, hidden]`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?;
    let summed = hidden.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?.sum(1)?;
    let counts = mask.sum_keepdim(1)?;
    Ok(summed.broadcast_div(&counts)?)
}

/// Every tensor of one transformer layer: its name under `encoder.layer.N` and its shape, as
/// [`Layer::load`] reads them. Fine-tuning makes these trainable and saves them.
pub fn layer_tensors(cfg: &EncoderConfig) -> Vec<(String, Vec<usize>)> {
    let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = Vec::new();
    let mut linear = |name: &str, out_dim: usize, in_dim: usize| {
        out.push((format!("{name}.weight"), vec![out_dim, in_dim]));
        out.push((format!("{name}.bias"), vec![out_dim]));
    };
    for name in ["query", "key", "value"] {
        linear(&format!("attention.self.{name}"), h, h);
    }
    linear("attention.output.dense", h, h);
    linear("intermediate.dense", ff, h);
    linear("output.dense", h, ff);
    for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
        out.push((format!("{norm}.weight"), vec![h]));
        out.push((format!("{norm}.bias"), vec![h]));
    }
    out
}
