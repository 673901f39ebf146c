//! Small heads on top of the encoder's output: the theme head (pooled vectors → theme logits)
//! and the NER head (token states → BIO tag logits).
//! Heads are candle-nn modules stored as safetensors with a JSON card; they know nothing of
//! files beyond their own, or of devices beyond the one they are given.

pub mod ner;
pub mod theme;

pub use theme::{Pooling, ThemeCard, ThemeHead, ThemeMetrics};
