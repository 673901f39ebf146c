//! From a text to encoder windows: tokenisation with offsets, the e5 prefix, windows.
//!
//! Every token keeps a [`Span`] of byte offsets into the ORIGINAL text (the tokenizer's
//! normaliser keeps that alignment), so later stages can cut sentences and entities out of the
//! input exactly. Special tokens and the `passage: ` prefix have no span. This module knows
//! nothing of tensors.

mod sentences;
pub mod unigram;
mod window;

use std::ops::Range;
use std::path::Path;

use tokenizers::{
    DecoderWrapper, Encoding, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerImpl,
};

use crate::error::{Error, Result};
pub use sentences::sentence_spans;
pub use window::{owning_window, plan_windows};

/// A byte range `start..end` in the original text; `start <= end`, both on char boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Span {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

impl Span {
    /// The range form, for slicing: `&text[span.range()]`.
    pub fn range(self) -> Range<usize> {
        self.start..self.end
    }
}

/// How long texts are cut into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Tokens per window, special tokens and prefix included (default 512, the model's limit).
    pub max_tokens: usize,
    /// Tokens shared by consecutive windows of a long text (default 64).
    pub overlap: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            max_tokens: 512,
            overlap: 64,
        }
    }
}

/// One encoder input: special tokens, prefix and a run of the text's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Token ids fed to the encoder.
    pub ids: Vec<u32>,
    /// Per id: its bytes in the original text, `None` for special and prefix tokens.
    pub spans: Vec<Option<Span>>,
    /// Which of the text's content tokens this window holds (indices into the whole text's
    /// token sequence, prefix and specials excluded).
    pub content: Range<usize>,
    /// Index in `ids` of the first content token.
    pub content_offset: usize,
}

/// A text cut into windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    /// The windows, in text order; together they hold every content token.
    pub windows: Vec<Window>,
    /// Number of content tokens in the whole text.
    pub content_tokens: usize,
}

/// The `tokenizers` pipeline with the compact Unigram model (see [`unigram`]).
pub type CompactTokenizer = TokenizerImpl<
    unigram::CompactUnigram,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// The tokenizer a model folder's `tokenizer.json` describes: Unigram models (XLM-R, e5) get
/// the compact model, about 270 MB less resident memory; others (WordPiece, BPE) the crate's.
#[derive(Clone)]
pub enum TextTokenizer {
    /// A Unigram model without byte fallback.
    Compact(Box<CompactTokenizer>),
    /// Any other model.
    Standard(Box<Tokenizer>),
}

impl TextTokenizer {
    /// Reads `tokenizer.json` bytes.
    ///
    /// # Errors
    /// The `tokenizers` crate's message if the JSON is not a tokenizer.
    pub fn from_bytes(json: &[u8]) -> std::result::Result<Self, tokenizers::Error> {
        // A Unigram model is read straight into the compact form; anything else fails to, and
        // is read by the crate.
        match serde_json::from_slice::<CompactTokenizer>(json) {
            Ok(t) => Ok(TextTokenizer::Compact(Box::new(t))),
            Err(_) => Ok(TextTokenizer::Standard(Box::new(Tokenizer::from_bytes(
                json,
            )?))),
        }
    }

    /// Encodes `text` (with the post-processor's special tokens when `add_special_tokens`).
    ///
    /// # Errors
    /// The `tokenizers` crate's error.
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> std::result::Result<Encoding, tokenizers::Error> {
        match self {
            TextTokenizer::Compact(t) => t.encode(text, add_special_tokens),
            TextTokenizer::Standard(t) => t.encode(text, add_special_tokens),
        }
    }

    fn without_truncation_or_padding(&mut self) -> std::result::Result<(), tokenizers::Error> {
        match self {
            TextTokenizer::Compact(t) => {
                t.with_truncation(None)?;
                t.with_padding(None);
            }
            TextTokenizer::Standard(t) => {
                t.with_truncation(None)?;
                t.with_padding(None);
            }
        }
        Ok(())
    }
}

/// Tokeniser plus windowing rules.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: TextTokenizer,
    head: Vec<u32>,
    tail: Vec<u32>,
    window: WindowConfig,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("head", &self.head)
            .field("tail", &self.tail)
            .field("window", &self.window)
            .finish()
    }
}

impl TextEncoder {
    /// Loads `tokenizer.json` and prepares windows of `window` tokens, each starting with the
    /// model's leading special tokens and the tokens of `prefix` (e5's `"passage: "`; `""` for
    /// none).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Tokenizer`] if the file cannot be read or parsed;
    /// [`Error::Setting`] if the window leaves no room for text.
    pub fn from_file(path: &Path, prefix: &str, window: WindowConfig) -> Result<Self> {
        let json = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut tokenizer = TextTokenizer::from_bytes(&json).map_err(|e| Error::ModelFile {
            path: path.to_path_buf(),
            offset: 0,
            message: format!("not a readable tokenizer.json: {e}"),
        })?;
        tokenizer
            .without_truncation_or_padding()
            .map_err(Error::Tokenizer)?;

        // The special tokens the post-processor puts around a text, found by encoding one.
        let probe = tokenizer.encode("a", true).map_err(Error::Tokenizer)?;
        let special = probe.get_special_tokens_mask();
        let first_content = special
            .iter()
            .position(|&s| s == 0)
            .unwrap_or(special.len());
        let last_content = special
            .iter()
            .rposition(|&s| s == 0)
            .map_or(first_content, |i| i + 1);
        let mut head = probe.get_ids()[..first_content].to_vec();
        let tail = probe.get_ids()[last_content..].to_vec();
        let prefix = prefix.trim_end();
        if !prefix.is_empty() {
            head.extend(
                tokenizer
                    .encode(prefix, false)
                    .map_err(Error::Tokenizer)?
                    .get_ids(),
            );
        }
        let fixed = head.len() + tail.len();
        if window.max_tokens <= fixed {
            return Err(Error::Setting(format!(
                "window_tokens {} leaves no room for text after {fixed} special and prefix tokens",
                window.max_tokens
            )));
        }
        if window.overlap >= window.max_tokens - fixed {
            return Err(Error::Setting(format!(
                "window_overlap {} must be below the {} text tokens a window of {} holds",
                window.overlap,
                window.max_tokens - fixed,
                window.max_tokens
            )));
        }
        Ok(TextEncoder {
            tokenizer,
            head,
            tail,
            window,
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The windowing rules.
    pub fn window_config(&self) -> WindowConfig {
        self.window
    }

    /// Text tokens one window holds.
    pub fn window_capacity(&self) -> usize {
        self.window.max_tokens - self.head.len() - self.tail.len()
    }

    /// Tokenises `text` and cuts it into windows. An empty text gives one window with only the
    /// special and prefix tokens.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the tokenizer fails on the text.
    pub fn encode(&self, text: &str) -> Result<TokenizedText> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(Error::Tokenizer)?;
        let ids = encoding.get_ids();
        let offsets = encoding.get_offsets();
        let ranges = plan_windows(ids.len(), self.window_capacity(), self.window.overlap);
        let windows = ranges
            .into_iter()
            .map(|content| {
                let mut window_ids =
                    Vec::with_capacity(self.head.len() + content.len() + self.tail.len());
                let mut spans = Vec::with_capacity(window_ids.capacity());
                window_ids.extend_from_slice(&self.head);
                spans.resize(self.head.len(), None);
                window_ids.extend_from_slice(&ids[content.clone()]);
                spans.extend(
                    offsets[content.clone()]
                        .iter()
                        .map(|&(start, end)| Some(visible(text, start, end))),
                );
                window_ids.extend_from_slice(&self.tail);
                spans.resize(window_ids.len(), None);
                Window {
                    ids: window_ids,
                    spans,
                    content,
                    content_offset: self.head.len(),
                }
            })
            .collect();
        Ok(TokenizedText {
            windows,
            content_tokens: ids.len(),
        })
    }
}

/// The token's bytes without surrounding whitespace: XLM-R's offsets for a word-initial piece
/// (`▁de`) include the space before the word, which no caller wants in an entity or a
/// sentence. A piece that is only whitespace (a lone `▁`) becomes an empty span at its end.
fn visible(text: &str, start: usize, end: usize) -> Span {
    let piece = &text[start..end];
    let trimmed_start = piece.len() - piece.trim_start().len();
    let trimmed_end = piece.trim_end().len();
    if trimmed_start >= trimmed_end {
        return Span { start: end, end };
    }
    Span {
        start: start + trimmed_start,
        end: start + trimmed_end,
    }
}
