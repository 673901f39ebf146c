//! The sizes of a BERT-family encoder.

/// Activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact GELU, `x * Φ(x)` with the error function (BERT's and XLM-R's `gelu`).
    Gelu,
    /// The tanh approximation of GELU (`gelu_new`).
    GeluTanh,
    /// ReLU.
    Relu,
}

/// Sizes and conventions of a BERT / XLM-RoBERTa encoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EncoderConfig {
    /// Rows of the token-embedding table.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Rows of the position-embedding table.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (only type 0 is used).
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// Feed-forward activation.
    pub hidden_act: HiddenAct,
    /// Row of the position table used for the first token: 0 for BERT, `pad_token_id + 1` for
    /// RoBERTa-style checkpoints, 0 for the default model's container (stored already shifted).
    pub position_offset: usize,
    /// Id of the padding token.
    pub pad_token_id: u32,
}

impl EncoderConfig {
    /// The longest sequence the position table allows, special tokens included.
    pub fn max_sequence_len(&self) -> usize {
        self.max_position_embeddings - self.position_offset
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
