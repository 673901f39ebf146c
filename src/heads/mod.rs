//! Small heads on top of the encoder's output: the theme head (pooled vectors → theme logits)
//! and the NER head (token states → BIO tag logits).
//! Heads are candle-nn modules stored as safetensors with a JSON card; they know nothing of
//! files beyond their own, or of devices beyond the one they are given.

pub mod dense;
pub mod ner;
pub mod theme;

pub use theme::{Pooling, ThemeCard, ThemeHead, ThemeMetrics};

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
