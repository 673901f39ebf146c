//! Hugging Face checkpoints: `config.json` and the tensor-name prefix of `model.safetensors`.

use std::path::Path;

use serde::Deserialize;

use crate::encoder::{EncoderConfig, HiddenAct};
use crate::error::{Error, Result};

/// The keys of a BERT / XLM-RoBERTa `config.json` that the encoder needs; others are ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// Reads `config.json` into the encoder's sizes.
pub(crate) fn read_config(path: &Path) -> Result<EncoderConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let raw: HfConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("line {} column {}: {e}", e.line(), e.column()),
    })?;
    let bad = |message: String| Error::Config {
        path: path.to_path_buf(),
        message,
    };

    let model_type = raw.model_type.as_deref().unwrap_or("bert");
    // RoBERTa-style models number positions from `pad_token_id + 1`; BERT from 0.
    let (position_offset, pad_token_id) = match model_type {
        "bert" => (0, raw.pad_token_id.unwrap_or(0)),
        "xlm-roberta" | "roberta" => {
            let pad = raw.pad_token_id.unwrap_or(1);
            (pad as usize + 1, pad)
        }
        other => {
            return Err(bad(format!(
                "model_type `{other}` is not supported: expected `bert`, `xlm-roberta` or `roberta`"
            )))
        }
    };
    if let Some(kind) = raw
        .position_embedding_type
        .as_deref()
        .filter(|k| *k != "absolute")
    {
        return Err(bad(format!(
            "position_embedding_type `{kind}` is not supported, only `absolute`"
        )));
    }
    let hidden_act = match raw.hidden_act.as_str() {
        "gelu" => HiddenAct::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => HiddenAct::GeluTanh,
        "relu" => HiddenAct::Relu,
        other => {
            return Err(bad(format!(
                "hidden_act `{other}` is not supported: expected gelu, gelu_new or relu"
            )))
        }
    };
    if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
        return Err(bad(format!(
            "hidden_size {} must be a multiple of num_attention_heads {}",
            raw.hidden_size, raw.num_attention_heads
        )));
    }
    if raw.max_position_embeddings <= position_offset {
        return Err(bad(format!(
            "max_position_embeddings {} leaves no positions after the offset {position_offset}",
            raw.max_position_embeddings
        )));
    }
    Ok(EncoderConfig {
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        num_hidden_layers: raw.num_hidden_layers,
        num_attention_heads: raw.num_attention_heads,
        intermediate_size: raw.intermediate_size,
        max_position_embeddings: raw.max_position_embeddings,
        type_vocab_size: raw.type_vocab_size,
        layer_norm_eps: raw.layer_norm_eps,
        hidden_act,
        position_offset,
        pad_token_id,
    })
}

/// The prefix under which a checkpoint stores the encoder (`""`, `"bert."`, `"roberta."`).
pub(crate) fn tensor_prefix(vb: &candle_nn::VarBuilder<'static>) -> Option<String> {
    ["", "bert.", "roberta.", "xlm-roberta."]
        .into_iter()
        .find(|p| vb.contains_tensor(&format!("{p}embeddings.word_embeddings.weight")))
        .map(str::to_string)
}
