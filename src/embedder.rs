//! The public entry point for embeddings and token states: [`Embedder`] and its builder.
//!
//! Data flows one way: texts → windows ([`crate::text`]) → batches under a token budget
//! ([`crate::batch`]) → one encoder pass per batch ([`crate::encoder`]) → host arrays.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use ndarray::{Array1, Array2};
use rayon::prelude::*;

use crate::batch::{plan_batches, Batch};
use crate::encoder::{CpuPath, Encoder};
use crate::error::{Error, Result};
use crate::text::{Span, TextEncoder, TokenizedText, WindowConfig};
use crate::weights::{Checkpoint, ModelSource};

/// The e5 prefix for texts that are searched or classified rather than used as queries.
pub const PASSAGE_PREFIX: &str = "passage: ";

/// Configures and loads an [`Embedder`]. Every setting has a default; all loading and
/// validation happens in [`EmbedderBuilder::build`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EmbedderBuilder {
    source: ModelSource,
    device: Device,
    dtype: DType,
    batch_tokens: Option<usize>,
    threads: Option<usize>,
    q4_matmul: bool,
    window_tokens: Option<usize>,
    window_overlap: Option<usize>,
    prefix: String,
    layer_mean: usize,
    cpu_path: CpuPath,
    replacements: Option<PathBuf>,
    keep_layers: Option<usize>,
    layer_mean_end: Option<usize>,
}

impl Default for EmbedderBuilder {
    fn default() -> Self {
        EmbedderBuilder {
            source: ModelSource::Default,
            device: Device::Cpu,
            dtype: DType::F32,
            batch_tokens: None,
            threads: None,
            q4_matmul: false,
            window_tokens: None,
            window_overlap: None,
            prefix: PASSAGE_PREFIX.to_string(),
            layer_mean: 1,
            cpu_path: CpuPath::Auto,
            replacements: None,
            keep_layers: None,
            layer_mean_end: None,
        }
    }
}

impl EmbedderBuilder {
    /// Where the model comes from. Default: [`ModelSource::Default`].
    pub fn model(mut self, source: ModelSource) -> Self {
        self.source = source;
        self
    }

    /// The compute device. Default: CPU. See [`crate::device::select_device`].
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Dtype of dense weights and activations. Default: f32 (the only one the quantised
    /// default model accepts; f16/bf16 suit dense checkpoints on a GPU).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Upper bound on the padded tokens (`rows × longest`) of one encoder batch. Default:
    /// 1024 on CPU (attention scores of bigger batches fall out of cache and cost more than
    /// they save), 16384 on a GPU. A window longer than the budget still runs, alone.
    pub fn batch_tokens(mut self, tokens: usize) -> Self {
        self.batch_tokens = Some(tokens);
        self
    }

    /// Run the default model's Q4_0 linear layers through candle's quantised matmul instead of
    /// f32 GEMMs over weights dequantised once at load. Default: `false` (faster on CPU). See
    /// [`Checkpoint::set_q4_matmul`].
    pub fn q4_matmul(mut self, yes: bool) -> Self {
        self.q4_matmul = yes;
        self
    }

    /// Which code runs the encoder on a CPU. Default: [`CpuPath::Auto`], the int8 path on CPUs
    /// with AVX-512 VNNI and candle's kernels elsewhere. [`CpuPath::Reference`] gives the
    /// f32 results the int8 path is measured against (cosine ≥ 0.999 per text embedding).
    pub fn cpu_path(mut self, path: CpuPath) -> Self {
        self.cpu_path = path;
        self
    }

    /// Worker threads for the encoder. Default: the machine's available parallelism. The
    /// embedder owns its thread pool; no global pool is touched.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Tokens per window, specials and prefix included. Default: the model's limit (512 for
    /// multilingual-e5-small).
    pub fn window_tokens(mut self, tokens: usize) -> Self {
        self.window_tokens = Some(tokens);
        self
    }

    /// Tokens shared by consecutive windows of a long text. Default: 64, or an eighth of the
    /// window for models with short windows.
    pub fn window_overlap(mut self, tokens: usize) -> Self {
        self.window_overlap = Some(tokens);
        self
    }

    /// Text put before every window, as e5 expects. Default `"passage: "`; `""` for models
    /// trained without one.
    pub fn text_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Loads the tokenizer and encoder.
    ///
    /// Also keep, per token, the mean of the last `k` layers' outputs
    /// ([`WindowStates::layer_mean`]) for token-level heads. Default 1: last layer only, no
    /// extra copy.
    pub fn layer_mean(mut self, k: usize) -> Self {
        self.layer_mean = k;
        self
    }

    /// The layers averaged by [`EmbedderBuilder::layer_mean`] end at layer `n` (1-based; the
    /// `k` layers `n − k + 1 ..= n`) instead of the last: middle layers keep more of what a
    /// token is than the last ones, which e5 trained for sentence vectors. The last layer's
    /// states ([`WindowStates::hidden`]) are unchanged.
    pub fn layer_mean_ending_at(mut self, n: usize) -> Self {
        self.layer_mean_end = Some(n);
        self
    }

    /// Lays the tensors of a safetensors file over the model's (fine-tuned layers, named as in
    /// a Hugging Face `BertModel`: `encoder.layer.11.attention.self.query.weight`). The
    /// analyzer passes its heads folder's [`crate::heads::ENCODER_LAYERS`] file here.
    pub fn replace_tensors(mut self, file: impl Into<PathBuf>) -> Self {
        self.replacements = Some(file.into());
        self
    }

    /// Runs only the first `layers` transformer layers: token states are that layer's output.
    /// For training on intermediate states; default: all layers.
    pub fn keep_layers(mut self, layers: usize) -> Self {
        self.keep_layers = Some(layers);
        self
    }

    /// # Errors
    /// [`Error::ModelFolder`] if the model's files are missing, [`Error::ModelFile`] /
    /// [`Error::Config`] / [`Error::Tensor`] if they are malformed, [`Error::Setting`] for a
    /// setting out of range (zero threads or budget, a window longer than the model allows,
    /// an overlap that leaves no progress).
    pub fn build(self) -> Result<Embedder> {
        let batch_tokens =
            self.batch_tokens
                .unwrap_or(if self.device.is_cpu() { 1024 } else { 16384 });
        if batch_tokens == 0 {
            return Err(Error::Setting("batch_tokens must be at least 1".into()));
        }
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            return Err(Error::Setting("threads must be at least 1".into()));
        }
        let files = self.source.resolve()?;
        let mut checkpoint = Checkpoint::load(&files, &self.device, self.dtype)?;
        checkpoint.set_q4_matmul(self.q4_matmul);
        if let Some(file) = &self.replacements {
            checkpoint.replace_tensors_from(file)?;
        }
        if let Some(layers) = self.keep_layers {
            checkpoint.keep_layers(layers)?;
        }
        let limit = checkpoint.config().max_sequence_len();
        let max_tokens = self.window_tokens.unwrap_or(limit);
        if max_tokens > limit {
            return Err(Error::Setting(format!(
                "window_tokens {max_tokens} exceeds the model's limit of {limit} tokens"
            )));
        }
        let overlap = self
            .window_overlap
            .unwrap_or((max_tokens / 8).min(WindowConfig::default().overlap));
        let window = WindowConfig {
            max_tokens,
            overlap,
        };
        let text = TextEncoder::from_file(&files.tokenizer, &self.prefix, window)?;
        let layers = checkpoint.config().num_hidden_layers;
        let end = self.layer_mean_end.unwrap_or(layers);
        if end == 0 || end > layers {
            return Err(Error::Setting(format!(
                "layer_mean_ending_at({end}): the encoder has layers 1 to {layers}"
            )));
        }
        let layer_mean = if self.layer_mean <= 1 && end == layers {
            0..0
        } else {
            end - self.layer_mean.clamp(1, end)..end
        };
        let encoder = Encoder::load_with(&checkpoint, self.cpu_path)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("themescan-{i}"))
            .build()
            .map_err(|e| Error::Setting(format!("cannot start {threads} threads: {e}")))?;
        Ok(Embedder {
            inner: Arc::new(Inner {
                text,
                encoder,
                pool,
                batch_tokens,
                threads,
                layer_mean,
            }),
        })
    }
}

struct Inner {
    text: TextEncoder,
    encoder: Encoder,
    pool: rayon::ThreadPool,
    batch_tokens: usize,
    threads: usize,
    /// Layers (0-based) averaged into [`WindowStates::layer_mean`]; empty for none.
    layer_mean: Range<usize>,
}

/// Embeds texts with a multilingual encoder: one L2-normalised vector per text, or per-token
/// hidden states with their offsets for heads that work on tokens.
///
/// Cheap to clone; `Send + Sync`; build once and reuse.
///
/// # Example
/// ```no_run
/// # fn main() -> themescan::Result<()> {
/// use themescan::Embedder;
///
/// let embedder = Embedder::builder().threads(2).build()?;
/// let vectors = embedder.embed(&["De politie heeft een website offline gehaald.", "تم حظر القناة"])?;
/// assert_eq!(vectors.dim(), (2, 384));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Embedder {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("encoder", self.inner.encoder.config())
            .field("text", &self.inner.text)
            .field("batch_tokens", &self.inner.batch_tokens)
            .field("threads", &self.inner.threads)
            .finish()
    }
}

/// The encoder's output for one window of a text.
#[derive(Debug, Clone)]
pub struct WindowStates {
    /// Token ids fed to the encoder (specials and prefix included).
    pub ids: Vec<u32>,
    /// Per token: bytes in the original text; `None` for special and prefix tokens.
    pub spans: Vec<Option<Span>>,
    /// Last-layer hidden state per token, `[ids.len(), hidden]`.
    pub hidden: Array2<f32>,
    /// Mean of the hidden states over all of the window's tokens (not normalised).
    pub mean: Array1<f32>,
    /// Per token, the mean of `k` layers' outputs (the last `k`, or those ending at
    /// [`EmbedderBuilder::layer_mean_ending_at`]), `[ids.len(), hidden]`, when the embedder was
    /// built with [`EmbedderBuilder::layer_mean`] `k > 1` or with a middle end layer.
    pub layer_mean: Option<Array2<f32>>,
    /// The text's content tokens this window holds.
    pub content: Range<usize>,
    /// Index in `ids` of the first content token.
    pub content_offset: usize,
}

impl WindowStates {
    /// The per-token tables `source` reads, each `[ids.len(), hidden]`; a token's state is
    /// their rows joined in this order.
    ///
    /// # Errors
    /// [`Error::Setting`] for a source that reads the layer mean when the embedder was not
    /// built with [`EmbedderBuilder::layer_mean`].
    pub fn states(&self, source: TokenSource) -> Result<Vec<&Array2<f32>>> {
        let layer_mean = || {
            self.layer_mean.as_ref().ok_or_else(|| {
                Error::Setting(
                    "layer-mean token states were asked for, but the embedder was built \
                     without `layer_mean(k)`"
                        .into(),
                )
            })
        };
        Ok(match source {
            TokenSource::LastLayer => vec![&self.hidden],
            TokenSource::LayerMean => vec![layer_mean()?],
            TokenSource::LayerMeanAndLast => vec![layer_mean()?, &self.hidden],
        })
    }
}

/// Adds token `row`'s state (the rows of `tables` joined) divided by `divisor` to the start
/// of `out`: one term of a word's mean over its sub-tokens.
pub fn add_token_state(tables: &[&Array2<f32>], row: usize, divisor: f32, out: &mut [f32]) {
    let mut at = 0;
    for table in tables {
        let state = table.row(row);
        for (o, v) in out[at..at + state.len()].iter_mut().zip(state) {
            *o += v / divisor;
        }
        at += state.len();
    }
}

/// The encoder's output for one text.
#[derive(Debug, Clone)]
pub struct TextStates {
    /// The text's embedding, as [`Embedder::embed`] gives it.
    pub embedding: Array1<f32>,
    /// Its windows, in text order.
    pub windows: Vec<WindowStates>,
    /// Number of the text's tokens (prefix and specials excluded).
    pub content_tokens: usize,
}

impl TextStates {
    /// For a text that is `words` joined by single spaces: one feature row per word, row-major
    /// `[words.len(), source.width(hidden)]`, read from `source` and pooled over the word's sub-tokens by
    /// `pooling` (zeros for a word with no token). A word is read from the first window that
    /// holds it. Training and evaluation of the NER head both use this, so they cannot disagree
    /// on alignment.
    ///
    /// # Errors
    /// [`Error::Setting`] if `source` is [`TokenSource::LayerMean`] and the embedder was not
    /// built to keep it.
    pub fn word_states(
        &self,
        words: &[String],
        source: TokenSource,
        pooling: WordPooling,
    ) -> Result<Vec<f32>> {
        let h = source.width(self.embedding.len());
        let tables = self
            .windows
            .iter()
            .map(|w| w.states(source))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(words.len() * h);
        for found in self.word_rows(words) {
            let at = out.len();
            out.extend(std::iter::repeat_n(0f32, h));
            let Some((window, rows)) = found else {
                continue;
            };
            let rows = match pooling {
                WordPooling::First => &rows[..1],
                WordPooling::Mean => &rows[..],
            };
            for &r in rows {
                add_token_state(&tables[window], r, rows.len() as f32, &mut out[at..]);
            }
        }
        Ok(out)
    }

    /// For a text that is `words` joined by single spaces: per word, the window that holds it
    /// (the first one that does) and the rows of its sub-tokens there, in order; `None` for a
    /// word with no token. [`TextStates::word_states`] pools these rows; training code that runs
    /// its own layers over the states reads them directly, so both align words alike.
    pub fn word_rows(&self, words: &[String]) -> Vec<Option<(usize, Vec<usize>)>> {
        // Per window, (start byte, row) of every content token, ascending.
        let starts: Vec<Vec<(usize, usize)>> = self
            .windows
            .iter()
            .map(|w| {
                w.spans
                    .iter()
                    .enumerate()
                    .filter_map(|(r, sp)| sp.map(|sp| (sp.start, r)))
                    .collect()
            })
            .collect();
        let mut start = 0;
        words
            .iter()
            .map(|word| {
                let (ws, we) = (start, start + word.len());
                start = we + 1;
                starts.iter().enumerate().find_map(|(window, starts)| {
                    let from = starts.partition_point(|&(s, _)| s < ws);
                    let rows: Vec<usize> = starts[from..]
                        .iter()
                        .take_while(|&&(s, _)| s < we)
                        .map(|&(_, r)| r)
                        .collect();
                    (!rows.is_empty()).then_some((window, rows))
                })
            })
            .collect()
    }
}

/// Which per-token states a token-level head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// [`WindowStates::hidden`]: the last layer.
    LastLayer,
    /// [`WindowStates::layer_mean`]: the mean of a few layers (the last ones, or those ending
    /// at [`EmbedderBuilder::layer_mean_ending_at`]).
    LayerMean,
    /// The layer mean followed by the last layer, twice the encoder's width: a head over it
    /// learns its own mix of the middle layers and the last.
    LayerMeanAndLast,
}

impl TokenSource {
    /// Width of one token's state for an encoder of width `hidden`.
    pub fn width(self, hidden: usize) -> usize {
        match self {
            TokenSource::LastLayer | TokenSource::LayerMean => hidden,
            TokenSource::LayerMeanAndLast => 2 * hidden,
        }
    }

    /// Whether the source reads [`WindowStates::layer_mean`].
    pub fn reads_layer_mean(self) -> bool {
        self != TokenSource::LastLayer
    }
}

/// How the states of a word's sub-tokens become the word's one feature row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordPooling {
    /// The first sub-token's state.
    First,
    /// The mean of all its sub-tokens' states.
    Mean,
}

/// Embeddings with what they cost: see [`Embedder::embed_with_counts`].
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// One L2-normalised row per text.
    pub vectors: Array2<f32>,
    /// Encoder tokens per text, over all its windows, special and prefix tokens included.
    pub tokens: Vec<usize>,
    /// Windows per text.
    pub windows: Vec<usize>,
}

/// Per window: pooled mean, and hidden states when asked for.
struct WindowOutput {
    mean: Vec<f32>,
    hidden: Option<Array2<f32>>,
    layer_mean: Option<Array2<f32>>,
}

impl Embedder {
    /// A builder with the defaults (default model, CPU, f32).
    pub fn builder() -> EmbedderBuilder {
        EmbedderBuilder::default()
    }

    /// Runs `f` on the embedder's thread pool, so that rayon work inside it uses the
    /// embedder's threads (and no more).
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.inner.pool.install(f)
    }

    /// The CPU path the encoder runs (see [`CpuPath::resolve`]); [`CpuPath::Reference`] on
    /// GPUs.
    pub fn cpu_path(&self) -> CpuPath {
        self.inner.encoder.cpu_path()
    }

    /// What runs the encoder, for logs (see [`Encoder::describe`]).
    pub fn describe_compute(&self) -> String {
        self.inner.encoder.describe()
    }

    /// Width of the embeddings and hidden states.
    pub fn hidden_size(&self) -> usize {
        self.inner.encoder.config().hidden_size
    }

    /// The tokenizer and windowing rules.
    pub fn text_encoder(&self) -> &TextEncoder {
        &self.inner.text
    }

    /// One L2-normalised embedding per text, `[texts.len(), hidden]`.
    ///
    /// A text longer than one window is cut into overlapping windows (none dropped); its
    /// embedding is the mean of its windows' mean-pooled states weighted by each window's
    /// text-token count, then normalised. An empty text is embedded as the prefix alone.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] or a tensor error; nothing is returned for any text then.
    pub fn embed(&self, texts: &[&str]) -> Result<Array2<f32>> {
        Ok(self.embed_with_counts(texts)?.vectors)
    }

    /// As [`Embedder::embed`], with the encoder tokens and windows each text cost.
    ///
    /// # Errors
    /// As [`Embedder::embed`].
    pub fn embed_with_counts(&self, texts: &[&str]) -> Result<Embeddings> {
        let tokenized = self.tokenize(texts)?;
        let outputs = self.encode(&tokenized, false)?;
        let h = self.hidden_size();
        let mut vectors = Array2::zeros((texts.len(), h));
        for ((row, text), windows) in vectors.outer_iter_mut().zip(&tokenized).zip(&outputs) {
            let means = windows.iter().map(|w| w.mean.as_slice());
            write_text_embedding(row, text, means);
        }
        let tokens = tokenized
            .iter()
            .map(|t| t.windows.iter().map(|w| w.ids.len()).sum())
            .collect();
        let windows = tokenized.iter().map(|t| t.windows.len()).collect();
        Ok(Embeddings {
            vectors,
            tokens,
            windows,
        })
    }

    /// Hidden states and offsets of every window of every text, and each text's embedding.
    ///
    /// # Errors
    /// As [`Embedder::embed`].
    pub fn token_states(&self, texts: &[&str]) -> Result<Vec<TextStates>> {
        let tokenized = self.tokenize(texts)?;
        self.token_states_of(tokenized)
    }

    /// Tokenises and windows texts on the calling thread, for [`Embedder::token_states_of`].
    /// Lets a pipeline tokenise the next texts while the encoder works on the current ones.
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn tokenize_here(&self, texts: &[&str]) -> Result<Vec<TokenizedText>> {
        texts.iter().map(|t| self.inner.text.encode(t)).collect()
    }

    /// As [`Embedder::token_states`], for texts already tokenised.
    ///
    /// # Errors
    /// A tensor error.
    pub fn token_states_of(&self, tokenized: Vec<TokenizedText>) -> Result<Vec<TextStates>> {
        let outputs = self.encode(&tokenized, true)?;
        let h = self.hidden_size();
        Ok(tokenized
            .into_iter()
            .zip(outputs)
            .map(|(text, windows)| {
                let mut embedding = Array1::zeros(h);
                write_text_embedding(
                    embedding.view_mut(),
                    &text,
                    windows.iter().map(|w| w.mean.as_slice()),
                );
                let windows = text
                    .windows
                    .into_iter()
                    .zip(windows)
                    .map(|(w, out)| WindowStates {
                        hidden: out
                            .hidden
                            .expect("encode(keep_hidden = true) keeps every window's states"),
                        mean: Array1::from(out.mean),
                        layer_mean: out.layer_mean,
                        ids: w.ids,
                        spans: w.spans,
                        content: w.content,
                        content_offset: w.content_offset,
                    })
                    .collect();
                TextStates {
                    embedding,
                    windows,
                    content_tokens: text.content_tokens,
                }
            })
            .collect())
    }

    /// Tokenises texts in parallel on the embedder's threads.
    fn tokenize(&self, texts: &[&str]) -> Result<Vec<TokenizedText>> {
        let inner = &*self.inner;
        inner
            .pool
            .install(|| texts.par_iter().map(|t| inner.text.encode(t)).collect())
    }

    /// Batches and encodes; returns per text its windows' outputs in order.
    fn encode(
        &self,
        tokenized: &[TokenizedText],
        keep_hidden: bool,
    ) -> Result<Vec<Vec<WindowOutput>>> {
        let inner = &*self.inner;
        inner.pool.install(|| {
            // Every window of every text, as (text, window) pairs, so that one batch mixes texts.
            let slots: Vec<(usize, usize)> = tokenized
                .iter()
                .enumerate()
                .flat_map(|(t, text)| (0..text.windows.len()).map(move |w| (t, w)))
                .collect();
            let lengths: Vec<usize> = slots
                .iter()
                .map(|&(t, w)| tokenized[t].windows[w].ids.len())
                .collect();
            let mut outputs: Vec<Vec<Option<WindowOutput>>> = tokenized
                .iter()
                .map(|t| (0..t.windows.len()).map(|_| None).collect())
                .collect();
            let pad = inner.encoder.config().pad_token_id;
            for rows in plan_batches(&lengths, inner.batch_tokens) {
                let sequences: Vec<&[u32]> = rows
                    .iter()
                    .map(|&r| tokenized[slots[r].0].windows[slots[r].1].ids.as_slice())
                    .collect();
                let batch = Batch::new(&sequences, pad);
                let mean_of = if keep_hidden {
                    inner.layer_mean.clone()
                } else {
                    0..0
                };
                let encoded = inner.encoder.forward_with_layer_mean(&batch, mean_of)?;
                // Device-to-host copies are the expensive part on a GPU: one per output per batch.
                let means = encoded.row_means()?;
                let hidden = if keep_hidden {
                    Some(encoded.hidden_rows(batch.lengths())?)
                } else {
                    None
                };
                let layer_mean = encoded.layer_mean_rows(batch.lengths())?;
                let mut hidden = hidden.map(Vec::into_iter);
                let mut layer_mean = layer_mean.map(Vec::into_iter);
                for (&r, mean) in rows.iter().zip(means) {
                    let hidden = hidden.as_mut().and_then(Iterator::next);
                    let layer_mean = layer_mean.as_mut().and_then(Iterator::next);
                    let (t, w) = slots[r];
                    outputs[t][w] = Some(WindowOutput {
                        mean,
                        hidden,
                        layer_mean,
                    });
                }
            }
            let outputs = outputs
                .into_iter()
                .map(|windows| {
                    windows
                        .into_iter()
                        .map(|w| w.expect("every window is in one batch"))
                        .collect()
                })
                .collect();
            Ok(outputs)
        })
    }
}

/// Combines a text's window means into its embedding: weighted by text tokens, L2-normalised.
fn write_text_embedding<'a>(
    mut out: ndarray::ArrayViewMut1<'_, f32>,
    text: &TokenizedText,
    means: impl Iterator<Item = &'a [f32]>,
) {
    let mut total = 0f32;
    for (window, mean) in text.windows.iter().zip(means) {
        let weight = window.content.len().max(1) as f32;
        total += weight;
        out.iter_mut().zip(mean).for_each(|(o, m)| *o += weight * m);
    }
    let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    out.mapv_inplace(|v| v / norm);
    debug_assert!(total > 0.0, "every text has at least one window");
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array1};

    /// "ab c" as tokens [CLS] "a" "b" " c" [SEP]: word "ab" has two sub-tokens, "c" one.
    fn states() -> TextStates {
        let span = |start, end| Some(Span { start, end });
        TextStates {
            embedding: Array1::zeros(2),
            windows: vec![WindowStates {
                ids: vec![0, 1, 2, 3, 4],
                spans: vec![None, span(0, 1), span(1, 2), span(3, 4), None],
                hidden: array![[0., 0.], [1., 2.], [3., 4.], [5., 6.], [0., 0.]],
                mean: Array1::zeros(2),
                layer_mean: Some(array![
                    [0., 0.],
                    [10., 20.],
                    [30., 40.],
                    [50., 60.],
                    [0., 0.]
                ]),
                content: 0..3,
                content_offset: 1,
            }],
            content_tokens: 3,
        }
    }

    #[test]
    fn word_states_pool_sub_tokens_and_join_the_layer_mean_with_the_last_layer() {
        let words = ["ab".to_string(), "c".to_string()];
        let s = states();
        let read = |source, pooling| s.word_states(&words, source, pooling).unwrap();
        assert_eq!(
            read(TokenSource::LastLayer, WordPooling::First),
            vec![1., 2., 5., 6.]
        );
        assert_eq!(
            read(TokenSource::LayerMean, WordPooling::Mean),
            vec![20., 30., 50., 60.]
        );
        assert_eq!(
            read(TokenSource::LayerMeanAndLast, WordPooling::Mean),
            vec![20., 30., 2., 3., 50., 60., 5., 6.]
        );
        assert_eq!(TokenSource::LayerMeanAndLast.width(2), 4);
        let no_mean = TextStates {
            windows: vec![WindowStates {
                layer_mean: None,
                ..s.windows[0].clone()
            }],
            ..s.clone()
        };
        assert!(no_mean
            .word_states(&words, TokenSource::LayerMeanAndLast, WordPooling::Mean)
            .is_err());
    }
}
