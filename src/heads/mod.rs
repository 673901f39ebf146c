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

/// File in a heads folder holding encoder layers fine-tuned with the NER head (f16,
/// Hugging Face names). When present, the analyzer lays it over the model, and both heads
/// were trained on the encoder it makes.
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
