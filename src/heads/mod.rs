//! Small heads on top of the encoder's output: the theme head (pooled vectors → theme logits)
//! and the NER head (token states → BIO tag logits).
//! Heads are candle-nn modules stored as safetensors with a JSON card; they know nothing of
//! files beyond their own, or of devices beyond the one they are given.

pub mod crf;
pub mod dense;
pub mod neighbours;
pub mod ner;
pub mod scaling;
pub mod theme;

pub use theme::{Pooling, ThemeCard, ThemeHead, ThemeMetrics};

/// The sha256 (lower-case hex) of a heads folder's [`ENCODER_LAYERS`] file, `None` if there
/// is none: what the cards record and the analyzer checks.
///
/// # Errors
/// [`Error::Io`] if the file exists but cannot be read.
pub fn encoder_layers_sha256(folder: &Path) -> Result<Option<String>> {
    use sha2::Digest;
    let path = folder.join(ENCODER_LAYERS);
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    Ok(Some(format!("{:x}", sha2::Sha256::digest(&bytes))))
}

/// Which encoder layers a heads folder's [`ENCODER_LAYERS`] file replaces, numbered from 1
/// as the layer means of the cards count them (`encoder.layer.11.*` is layer 12); `None` if
/// there is no such file.
///
/// A head that reads a layer mean ending at layer `e` is unaffected by tuned layers that all
/// lie above `e`: that is what lets `train_ner` keep layers tuned for themes.
///
/// # Errors
/// [`Error::Candle`] if the file is not safetensors, [`Error::ModelFolder`] if it names no
/// encoder layer.
pub fn encoder_layers_tuned(folder: &Path) -> Result<Option<std::ops::RangeInclusive<usize>>> {
    let path = folder.join(ENCODER_LAYERS);
    if !path.is_file() {
        return Ok(None);
    }
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    let layers: Vec<usize> = tensors
        .keys()
        .filter_map(|name| {
            let rest = name.strip_prefix("encoder.layer.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .collect();
    match (layers.iter().min(), layers.iter().max()) {
        (Some(&low), Some(&high)) => Ok(Some(low + 1..=high + 1)),
        _ => Err(Error::ModelFolder {
            path: folder.to_path_buf(),
            message: format!("`{ENCODER_LAYERS}` holds no `encoder.layer.N.*` tensor"),
        }),
    }
}

/// File in a heads folder holding encoder layers fine-tuned with a head (f16, Hugging Face
/// names): with the NER head (`train_ner --fine-tune-layers`), or for themes above the
/// layers the NER head reads (`train_themes --fine-tune-layers`, as shipped). When present,
/// the analyzer lays it over the model, and both heads were trained on the encoder it makes.
pub const ENCODER_LAYERS: &str = "encoder-layers.safetensors";

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The paths of a head's card and weights in `folder`, or an error naming the missing file and
/// the `example` that trains the head.
fn head_files(
    folder: &Path,
    card: &str,
    weights: &str,
    example: &str,
) -> Result<(PathBuf, PathBuf)> {
    let (card, weights) = (folder.join(card), folder.join(weights));
    for p in [&card, &weights] {
        if !p.is_file() {
            return Err(Error::ModelFolder {
                path: folder.to_path_buf(),
                message: format!(
                    "no `{}`: train the head with `cargo run --release --example {example}`",
                    p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                ),
            });
        }
    }
    Ok((card, weights))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuned_layers_are_numbered_from_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(encoder_layers_tuned(dir.path()).unwrap(), None);
        let t = candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let file = dir.path().join(ENCODER_LAYERS);
        candle_core::safetensors::save(
            &std::collections::HashMap::from([
                ("encoder.layer.10.output.dense.bias".to_string(), t.clone()),
                ("encoder.layer.11.output.dense.bias".to_string(), t.clone()),
            ]),
            &file,
        )
        .unwrap();
        assert_eq!(encoder_layers_tuned(dir.path()).unwrap(), Some(11..=12));
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("pooler.dense.bias".to_string(), t)]),
            &file,
        )
        .unwrap();
        let err = encoder_layers_tuned(dir.path()).unwrap_err();
        assert!(err.to_string().contains("encoder.layer.N"), "{err}");
    }
}
