//! The public pipeline: articles in, [`Analysis`] out, from one encoder pass per window.
//!
//! Themes: each window's token states are pooled into one vector; the article's scores come
//! from those vectors by the rule its theme card names ([`Aggregation`]: the head on the mean
//! of the window vectors, or the best or two best window scores), chosen by cross-validation
//! when the head was trained, then calibrated per theme (Platt scaling) so that a score reads
//! as a probability. Every window is used; none is dropped. A card may also blend in the vote of
//! the training windows nearest to each window before calibration (`heads::neighbours`). A
//! head whose card names [`Aggregation::Sentences`] scores sentences instead of windows: the
//! article's logit is the smooth maximum of its sentences' logits.
//!
//! Evidence: every sentence's vector is pooled from its tokens' states, each token taken from
//! the window where it has most context on both sides, from the same pass; the theme head
//! scores it alone, and the best sentences of each reported theme are returned.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::Device;

use rayon::prelude::*;

use crate::embedder::{add_token_state, Embedder, EmbedderBuilder, TextStates, WordPooling};
use crate::entities::{group_entities, repair_bio, Entity, EntityGroup, Tag};
use crate::error::Result;
use crate::heads::neighbours::{article_vote, NeighbourIndex};
use crate::heads::ner::{NerCard, NerHead, NER_HEAD_CARD};
use crate::heads::theme::{
    join_context, mean_row, sentence_article_probabilities, sigmoid, Aggregation,
};
use crate::heads::{Pooling, ThemeCard, ThemeHead};
use crate::text::{owning_window, sentence_spans, Span, TokenizedText};
use crate::themes::{Evidence, Theme, ThemeScore};
use crate::train::conll::{entity_spans, pack_sentences};
use crate::weights::ModelSource;

/// An article to analyse.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Article {
    /// Caller's id, copied to the result.
    pub id: String,
    /// The text, page clutter and all.
    pub text: String,
    /// ISO 639-1 language code, if known (not needed: the encoder is multilingual).
    #[serde(default)]
    pub lang: Option<String>,
}

impl Article {
    /// An article with an id and a text.
    pub fn new(id: impl Into<String>, text: impl Into<String>) -> Self {
        Article {
            id: id.into(),
            text: text.into(),
            lang: None,
        }
    }
}

/// What the analyser found in one article.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Analysis {
    /// The article's id.
    pub id: String,
    /// Every theme of every theme set loaded, with its score, in [`Analyzer::themes`] order.
    pub themes: Vec<ThemeScore>,
    /// The themes whose score reaches the head's tuned threshold.
    pub labels: Vec<Theme>,
    /// For each label, the sentences that carry it best, highest score first.
    pub evidence: Vec<Evidence>,
    /// Named-entity mentions in text order (empty when the heads folder has no NER head).
    pub entities: Vec<Entity>,
    /// The mentions grouped by surface form and type.
    pub entity_groups: Vec<EntityGroup>,
    /// Encoder windows the article took.
    pub windows: usize,
    /// Encoder tokens the article took, special and prefix tokens included.
    pub tokens: usize,
}

/// Configures and loads an [`Analyzer`].
#[derive(Debug, Clone)]
#[must_use]
pub struct AnalyzerBuilder {
    embedder: EmbedderBuilder,
    heads: Option<PathBuf>,
    theme_sets: Vec<PathBuf>,
    evidence_per_theme: usize,
    segment_bytes: usize,
}

/// Default for [`AnalyzerBuilder::segment_bytes`].
pub const DEFAULT_SEGMENT_BYTES: usize = 128 * 1024;

impl Default for AnalyzerBuilder {
    fn default() -> Self {
        AnalyzerBuilder {
            embedder: Embedder::builder(),
            heads: None,
            theme_sets: Vec::new(),
            evidence_per_theme: 3,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

impl AnalyzerBuilder {
    /// Where the encoder comes from. Default: [`ModelSource::Default`].
    pub fn model(mut self, source: ModelSource) -> Self {
        self.embedder = self.embedder.model(source);
        self
    }

    /// Compute device. Default: CPU.
    pub fn device(mut self, device: Device) -> Self {
        self.embedder = self.embedder.device(device);
        self
    }

    /// Encoder threads. Default: all cores.
    pub fn threads(mut self, threads: usize) -> Self {
        self.embedder = self.embedder.threads(threads);
        self
    }

    /// Padded tokens per encoder batch. See [`EmbedderBuilder::batch_tokens`].
    pub fn batch_tokens(mut self, tokens: usize) -> Self {
        self.embedder = self.embedder.batch_tokens(tokens);
        self
    }

    /// Any other encoder setting, on the underlying [`EmbedderBuilder`].
    pub fn embedder(mut self, f: impl FnOnce(EmbedderBuilder) -> EmbedderBuilder) -> Self {
        self.embedder = f(self.embedder);
        self
    }

    /// The main heads folder: `themes.safetensors` and `themes.json`, and the NER head
    /// (`ner.*`) if it has one. Default: `models/heads/` of this crate's source tree (the
    /// built-in four themes and NER, committed there).
    pub fn heads(mut self, folder: impl Into<PathBuf>) -> Self {
        self.heads = Some(folder.into());
        self
    }

    /// Adds a theme set: a heads folder made by `train_themes --theme-set FILE --out DIR`
    /// (or any other theme head). Repeatable; its themes follow those of [`Self::heads`] in
    /// [`Analysis::themes`], and the encoder still runs once per window for all of them.
    /// Theme names must be unique across the folders. Entities come from the first folder,
    /// main folder first, that holds an NER head.
    ///
    /// ```no_run
    /// # fn main() -> themescan::Result<()> {
    /// let analyzer = themescan::Analyzer::builder()
    ///     .theme_set("my-sets/security-extra")
    ///     .build()?;
    /// let names: Vec<&str> = analyzer.themes().iter().map(|t| t.as_str()).collect();
    /// println!("{names:?}"); // the built-in four, then the set's own
    /// # Ok(()) }
    /// ```
    pub fn theme_set(mut self, folder: impl Into<PathBuf>) -> Self {
        self.theme_sets.push(folder.into());
        self
    }

    /// Evidence sentences returned per reported theme. Default 3.
    pub fn evidence_per_theme(mut self, n: usize) -> Self {
        self.evidence_per_theme = n;
        self
    }

    /// Most text bytes encoded at once. A longer article is cut into segments of about this
    /// size (at a paragraph, sentence or word break) that are analysed one group at a time and
    /// merged, so memory stays bounded for texts of any size; nothing is dropped. Articles are
    /// also grouped up to this size per encoder call. Default [`DEFAULT_SEGMENT_BYTES`].
    pub fn segment_bytes(mut self, bytes: usize) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// Loads the encoder and the heads.
    ///
    /// # Errors
    /// As [`EmbedderBuilder::build`]; [`crate::Error::ModelFolder`] if the heads are missing;
    /// [`crate::Error::Setting`] if the head was trained for another hidden size.
    pub fn build(self) -> Result<Analyzer> {
        let main = self.heads.unwrap_or_else(default_heads_folder);
        let device = Device::Cpu;
        let folders: Vec<PathBuf> = std::iter::once(main)
            .chain(self.theme_sets.iter().cloned())
            .collect();
        let mut sets: Vec<ThemeSet> = Vec::with_capacity(folders.len());
        let mut themes: Vec<Theme> = Vec::new();
        let mut poolings: Vec<Pooling> = Vec::new();
        for folder in &folders {
            let (head, card) = ThemeHead::from_folder(folder, &device)?;
            for theme in &card.labels {
                if let Some(other) = sets.iter().find(|s| s.card.labels.contains(theme)) {
                    return Err(crate::Error::Setting(format!(
                        "the theme `{theme}` is in two heads folders, {} and {}: theme names \
                         must be unique across the folders loaded",
                        other.folder.display(),
                        folder.display()
                    )));
                }
            }
            themes.extend(card.labels.iter().cloned());
            // Sets that pool alike share one pooled row per window and sentence.
            let pooled = match poolings.iter().position(|&p| p == card.pooling) {
                Some(i) => i,
                None => {
                    poolings.push(card.pooling);
                    poolings.len() - 1
                }
            };
            let neighbours = card
                .neighbours
                .map(|settings| {
                    NeighbourIndex::from_folder(
                        folder,
                        card.input_size,
                        card.labels.len(),
                        settings,
                    )
                })
                .transpose()?;
            sets.push(ThemeSet {
                folder: folder.clone(),
                head,
                card,
                neighbours,
                pooled,
            });
        }
        let mut ner = match folders.iter().find(|f| f.join(NER_HEAD_CARD).is_file()) {
            Some(folder) => Some((folder.clone(), NerHead::from_folder(folder, &device)?)),
            None => None,
        };
        let mut embedder = self.embedder;
        // Every head must have been trained on the encoder the folders make: the fine-tuned
        // layers of the first folder that has them, or the encoder as shipped.
        let mut layers = None;
        for folder in &folders {
            if let Some(sha) = crate::heads::encoder_layers_sha256(folder)? {
                layers = Some((folder.join(crate::heads::ENCODER_LAYERS), sha));
                break;
            }
        }
        let layers_sha = layers.as_ref().map(|(_, sha)| sha.clone());
        let mut trained_on: Vec<(String, &Path, Option<String>)> = sets
            .iter()
            .map(|s| {
                (
                    "theme".to_string(),
                    s.folder.as_path(),
                    s.card.encoder_layers_sha256.clone(),
                )
            })
            .collect();
        if let Some((folder, (_, ner_card))) = &ner {
            trained_on.push((
                "NER".to_string(),
                folder.as_path(),
                ner_card.encoder_layers_sha256.clone(),
            ));
        }
        for (head, folder, sha) in trained_on {
            if sha != layers_sha {
                let describe = |s: &Option<String>| match s {
                    Some(s) => format!("fine-tuned layers with sha256 {}", &s[..s.len().min(16)]),
                    None => "the frozen encoder (no fine-tuned layers)".to_string(),
                };
                return Err(crate::Error::ModelFolder {
                    path: folder.to_path_buf(),
                    message: format!(
                        "the {head} head was trained on {}, but the folders loaded make {}: \
                         retrain it (`train_themes`, with `--theme-set` for a set of your own)",
                        describe(&sha),
                        describe(&layers_sha)
                    ),
                });
            }
        }
        if let Some((file, _)) = &layers {
            embedder = embedder.replace_tensors(file);
        }
        // One layer mean per pass serves every head: they must agree on it.
        // (count, last) of the first head that reads a layer mean, its folder and kind.
        type LayerMeanOf<'a> = ((usize, Option<usize>), &'a Path, &'a str);
        let mut layer_mean: Option<LayerMeanOf> = None;
        let ner_layer_mean = ner
            .as_ref()
            .filter(|(_, (_, c))| c.token_source.reads_layer_mean())
            .map(|(f, (_, c))| ((c.layers, c.layers_end), f.as_path(), "NER"));
        let set_layer_means = sets
            .iter()
            .filter_map(|s| s.card.layer_mean.map(|m| (m, s.folder.as_path(), "theme")));
        for (mean, folder, head) in ner_layer_mean.into_iter().chain(set_layer_means) {
            match layer_mean {
                None => layer_mean = Some((mean, folder, head)),
                Some((first, first_folder, first_head)) if first != mean => {
                    return Err(crate::Error::ModelFolder {
                        path: folder.to_path_buf(),
                        message: format!(
                            "its {head} head pools the mean of layers {mean:?} (count, last) \
                             but the {first_head} head in {} reads {first:?}; the encoder makes \
                             one layer mean per pass: retrain the theme head (`train_themes`)",
                            first_folder.display()
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        if let Some(((count, end), _, _)) = layer_mean {
            embedder = embedder.layer_mean(count);
            if let Some(end) = end {
                embedder = embedder.layer_mean_ending_at(end);
            }
        }
        let embedder = embedder.build()?;
        if let Some((_, (head, _))) = &mut ner {
            // The heads' products follow the encoder's: int8 where it runs int8 (VNNI), so that
            // `CpuPath::Reference` stays an all-f32 reference.
            if embedder.cpu_path() == crate::CpuPath::Int8 {
                head.use_int8(crate::encoder::int8::gemm::Kernel::detect());
            }
        }
        if let Some((folder, (head, card))) = &ner {
            let width = card.token_source.width(embedder.hidden_size());
            if head.word_width() != width {
                return Err(crate::Error::Setting(format!(
                    "the NER head in {} reads word states of width {}, but the encoder's {:?} \
                     states are {width} wide",
                    folder.display(),
                    head.word_width(),
                    card.token_source
                )));
            }
        }
        for ThemeSet { folder, card, .. } in &sets {
            if card.input_size != card.expected_input_size(embedder.hidden_size()) {
                return Err(crate::Error::Setting(format!(
                    "the theme head in {} takes vectors of {} but {:?} pooling of the encoder's {} gives {}{}",
                    folder.display(),
                    card.input_size,
                    card.pooling,
                    embedder.hidden_size(),
                    card.pooling.output_size(embedder.hidden_size()),
                    match card.sentence_context {
                        Some(_) => ", twice that with the sentences' context",
                        None => "",
                    }
                )));
            }
        }
        Ok(Analyzer {
            embedder,
            sets,
            themes,
            poolings,
            ner: ner.map(|(_, head)| head),
            evidence_per_theme: self.evidence_per_theme,
            segment_bytes: self.segment_bytes.max(1024),
        })
    }
}

/// The heads folder committed with the crate.
pub fn default_heads_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join("heads")
}

/// Finds themes (and their evidence) in articles. Cheap to clone; `Send + Sync`.
///
/// # Example
/// ```no_run
/// # fn main() -> themescan::Result<()> {
/// use themescan::{Analyzer, Article};
///
/// let analyzer = Analyzer::builder().threads(2).build()?;
/// let analysis = analyzer.analyze(&Article::new("a1", "Europol en Belgische speurders haalden propagandakanalen offline."))?;
/// for label in &analysis.labels {
///     println!("{label}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Analyzer {
    embedder: Embedder,
    /// The main folder's theme head, then each added theme set's.
    sets: Vec<ThemeSet>,
    /// Every set's themes, in set order: the order of [`Analysis::themes`].
    themes: Vec<Theme>,
    /// The distinct poolings of the sets (`ThemeSet::pooled` indexes it).
    poolings: Vec<Pooling>,
    ner: Option<(NerHead, NerCard)>,
    evidence_per_theme: usize,
    segment_bytes: usize,
}

impl Analyzer {
    /// A builder with the defaults.
    pub fn builder() -> AnalyzerBuilder {
        AnalyzerBuilder::default()
    }

    /// The encoder underneath.
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// The main folder's theme card (thresholds, training data, dev metrics).
    pub fn theme_card(&self) -> &ThemeCard {
        &self.sets[0].card
    }

    /// Every theme the analyzer scores, in the order of [`Analysis::themes`].
    pub fn themes(&self) -> &[Theme] {
        &self.themes
    }

    /// The threshold at or above which `theme` is reported, if it is one of [`Self::themes`].
    pub fn threshold(&self, theme: &Theme) -> Option<f32> {
        let (s, k) = self.locate(theme)?;
        Some(self.sets[s].card.thresholds[k])
    }

    /// Analyses one article.
    ///
    /// # Errors
    /// As [`Embedder::embed`].
    pub fn analyze(&self, article: &Article) -> Result<Analysis> {
        Ok(self.analyze_many(std::slice::from_ref(article))?.remove(0))
    }

    /// Analyses many articles; their windows are packed together into encoder batches.
    /// Memory is bounded by [`AnalyzerBuilder::segment_bytes`], not by the input's size.
    ///
    /// # Errors
    /// As [`Embedder::embed`]; no result is returned for any article then.
    pub fn analyze_many(&self, articles: &[Article]) -> Result<Vec<Analysis>> {
        self.analyze_prepared(self.prepare(articles.to_vec())?)
    }

    /// The CPU-side first half of [`Analyzer::analyze_many`]: cuts long articles into segments
    /// and tokenises them on the calling thread. A pipeline prepares the next articles on one
    /// thread while [`Analyzer::analyze_prepared`] runs the encoder on the current ones.
    ///
    /// # Errors
    /// [`crate::Error::Tokenizer`].
    pub fn prepare(&self, articles: Vec<Article>) -> Result<PreparedArticles> {
        let mut pieces = Vec::new();
        for (i, a) in articles.iter().enumerate() {
            pieces.extend(
                segment_text(&a.text, self.segment_bytes)
                    .into_iter()
                    .map(|r| (i, r)),
            );
        }
        let mut groups = Vec::new();
        let mut start = 0;
        // Tokens take ~35 bytes each in memory: tokenising a huge article's every segment up
        // front could cost gigabytes, so only the first few groups are tokenised here and the
        // rest one at a time in `analyze_prepared`.
        let mut ahead = 0;
        while start < pieces.len() {
            let (mut end, mut bytes) = (start, 0);
            while end < pieces.len()
                && (end == start || bytes + pieces[end].1.len() <= self.segment_bytes)
            {
                bytes += pieces[end].1.len();
                end += 1;
            }
            let tokenized = if ahead < 4 {
                ahead += 1;
                Some(self.tokenize_pieces(&articles, &pieces[start..end])?)
            } else {
                None
            };
            groups.push((start..end, tokenized));
            start = end;
        }
        Ok(PreparedArticles {
            articles,
            pieces,
            groups,
        })
    }

    fn tokenize_pieces(
        &self,
        articles: &[Article],
        pieces: &[(usize, Range<usize>)],
    ) -> Result<Vec<TokenizedText>> {
        let texts: Vec<&str> = pieces
            .iter()
            .map(|(i, r)| &articles[*i].text[r.clone()])
            .collect();
        self.embedder.tokenize_here(&texts)
    }

    /// The encoder and heads half of [`Analyzer::analyze_many`].
    ///
    /// # Errors
    /// As [`Embedder::embed`]; no result is returned for any article then.
    pub fn analyze_prepared(&self, prepared: PreparedArticles) -> Result<Vec<Analysis>> {
        let PreparedArticles {
            articles,
            pieces,
            groups,
        } = prepared;
        let mut partials: Vec<Vec<Partial>> = articles.iter().map(|_| Vec::new()).collect();
        for (range, tokenized) in groups {
            let tokenized = match tokenized {
                Some(t) => t,
                None => self.tokenize_pieces(&articles, &pieces[range.clone()])?,
            };
            let states = self.embedder.token_states_of(tokenized)?;
            // Heads run per piece on the host: in parallel on the encoder's threads, which are
            // idle now. Results come back in piece order.
            let group = &pieces[range];
            let done: Vec<Result<Partial>> = self.embedder.install(|| {
                group
                    .par_iter()
                    .zip(&states)
                    .map(|((i, r), s)| self.analyze_piece(&articles[*i].text, r.clone(), s))
                    .collect()
            });
            for ((i, _), partial) in group.iter().zip(done) {
                partials[*i].push(partial?);
            }
        }
        articles
            .into_iter()
            .zip(partials)
            .map(|(a, p)| self.merge(a, p))
            .collect()
    }

    /// Window scores, evidence candidates and entities of the segment `range` of `text`;
    /// offsets in the result point into the whole text. A whole article needs
    /// evidence only for its labels; a segment cannot know them, so it gives its best
    /// sentences for every theme.
    fn analyze_piece(
        &self,
        text: &str,
        range: Range<usize>,
        states: &TextStates,
    ) -> Result<Partial> {
        let h = self.embedder.hidden_size();
        let offset = range.start;
        let whole = range.len() == text.len();
        let piece = &text[range];
        // Every window's pooled states, once per distinct pooling that a set scoring windows
        // reads (empty for the others); the article's scores come from them by each card's
        // rule.
        let window_rows: Vec<Vec<f32>> = self
            .poolings
            .iter()
            .enumerate()
            .map(|(i, pooling)| {
                let reads_windows = self
                    .sets
                    .iter()
                    .any(|s| s.pooled == i && s.card.aggregation != Aggregation::Sentences);
                if !reads_windows {
                    return Vec::new();
                }
                let mut rows = Vec::with_capacity(states.windows.len() * pooling.output_size(h));
                for w in &states.windows {
                    pooling.pool(
                        w.hidden.outer_iter(),
                        w.layer_mean.as_ref().map(|m| m.outer_iter()),
                        h,
                        &mut rows,
                    );
                }
                rows
            })
            .collect();
        // Sentences, and the sentence logits of every set that scores sentences: made once,
        // read by the article scores and the evidence; not at all for window heads when
        // nothing is reported.
        let mut sentences = self
            .sets
            .iter()
            .any(|s| s.card.aggregation == Aggregation::Sentences)
            .then(|| PieceSentences::of(piece, states));
        let sentence_logits = match &sentences {
            Some(sentences) => self.sentence_logits(sentences, states)?,
            None => vec![Vec::new(); self.sets.len()],
        };
        let (whole_probs, evidence_for) = if whole {
            let probs = self.article_probs(&window_rows, &sentence_logits)?;
            let labels = self.labels(&probs);
            (Some(probs), labels)
        } else {
            (None, self.themes.clone())
        };
        let mut evidence = if evidence_for.is_empty() {
            Vec::new()
        } else {
            let sentences = sentences.get_or_insert_with(|| PieceSentences::of(piece, states));
            self.evidence(sentences, states, &sentence_logits, &evidence_for)?
        };
        let mut entities = self.entities_from_states(piece, states)?;
        for e in &mut evidence {
            e.start += offset;
            e.end += offset;
        }
        for e in &mut entities {
            e.start += offset;
            e.end += offset;
        }
        Ok(Partial {
            window_rows,
            sentence_logits,
            whole_probs,
            evidence,
            entities,
            windows: states.windows.len(),
            tokens: states.windows.iter().map(|w| w.ids.len()).sum(),
        })
    }

    /// Calibrated article scores of every theme, from the pooled rows of all its windows (per
    /// pooling, row-major) and the sentence logits of all its sentences (per set), by each
    /// card's [`Aggregation`].
    fn article_probs(
        &self,
        window_rows: &[Vec<f32>],
        sentence_logits: &[Vec<Vec<f32>>],
    ) -> Result<Vec<f32>> {
        let mut probs = Vec::with_capacity(self.themes.len());
        for (set, logits) in self.sets.iter().zip(sentence_logits) {
            probs.extend(set.article_probs(&window_rows[set.pooled], logits)?);
        }
        Ok(probs)
    }

    /// Every sentence's logits (the members' mean, before calibration), per set: for the sets
    /// that score sentences ([`Aggregation::Sentences`]); empty for the others. Each pooling's
    /// rows are made once and dropped here: the logits are all that the article score and
    /// the evidence read, and all that a long article's segments carry to the merge.
    fn sentence_logits(
        &self,
        sentences: &PieceSentences,
        states: &TextStates,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; self.poolings.len()];
        let mut logits = Vec::with_capacity(self.sets.len());
        for set in &self.sets {
            logits.push(match set.card.aggregation {
                Aggregation::Sentences => {
                    self.score_sentences(set, sentences, states, &mut rows)?
                }
                _ => Vec::new(),
            });
        }
        Ok(logits)
    }

    /// `set`'s logits for every sentence of the piece, from its pooling's sentence rows,
    /// pooled here unless `rows` (per pooling) already holds them.
    fn score_sentences(
        &self,
        set: &ThemeSet,
        sentences: &PieceSentences,
        states: &TextStates,
        rows: &mut [Option<Vec<f32>>],
    ) -> Result<Vec<Vec<f32>>> {
        let h = self.embedder.hidden_size();
        let pooling = self.poolings[set.pooled];
        let rows =
            rows[set.pooled].get_or_insert_with(|| sentences.pooled_rows(states, pooling, h));
        if let Some(radius) = set.card.sentence_context {
            // The neighbourhoods end at the piece's edges: a long article read in segments
            // loses the few sentences across each cut, the only difference from training.
            let joined = join_context(rows, pooling.output_size(h), radius);
            return set.head.logits(&joined, set.card.input_size, &Device::Cpu);
        }
        set.head.logits(rows, set.card.input_size, &Device::Cpu)
    }

    /// The themes whose score reaches their set's threshold.
    fn labels(&self, probs: &[f32]) -> Vec<Theme> {
        let thresholds = self.sets.iter().flat_map(|s| &s.card.thresholds);
        self.themes
            .iter()
            .zip(probs)
            .zip(thresholds)
            .filter(|((_, p), t)| *p >= *t)
            .map(|((theme, _), _)| theme.clone())
            .collect()
    }

    /// One article's analysis from its segments' (in text order).
    fn merge(&self, article: Article, mut partials: Vec<Partial>) -> Result<Analysis> {
        let probs = match partials.as_mut_slice() {
            [one] if one.whole_probs.is_some() => one.whole_probs.take().expect("checked"),
            _ => {
                // A long article's windows and sentences are all its segments' together.
                let windows: Vec<Vec<f32>> = (0..self.poolings.len())
                    .map(|i| {
                        partials
                            .iter()
                            .flat_map(|p| p.window_rows[i].iter().copied())
                            .collect()
                    })
                    .collect();
                let sentences: Vec<Vec<Vec<f32>>> = (0..self.sets.len())
                    .map(|s| {
                        partials
                            .iter()
                            .flat_map(|p| p.sentence_logits[s].iter().cloned())
                            .collect()
                    })
                    .collect();
                self.article_probs(&windows, &sentences)?
            }
        };
        let themes: Vec<ThemeScore> = self
            .themes
            .iter()
            .zip(&probs)
            .map(|(theme, &score)| ThemeScore {
                theme: theme.clone(),
                score,
            })
            .collect();
        let labels = self.labels(&probs);
        let mut evidence = Vec::new();
        for theme in &labels {
            let mut of_theme: Vec<&Evidence> = partials
                .iter()
                .flat_map(|p| &p.evidence)
                .filter(|e| &e.theme == theme)
                .collect();
            of_theme.sort_by(|a, b| b.score.total_cmp(&a.score));
            evidence.extend(of_theme.into_iter().take(self.evidence_per_theme).cloned());
        }
        let windows = partials.iter().map(|p| p.windows).sum();
        let tokens = partials.iter().map(|p| p.tokens).sum();
        let entities: Vec<Entity> = partials.into_iter().flat_map(|p| p.entities).collect();
        let entity_groups = group_entities(&entities);
        Ok(Analysis {
            id: article.id,
            themes,
            labels,
            evidence,
            entities,
            entity_groups,
            windows,
            tokens,
        })
    }

    /// The NER head's card, if the heads folder has one.
    pub fn ner_card(&self) -> Option<&NerCard> {
        self.ner.as_ref().map(|(_, c)| c)
    }

    /// Named-entity mentions in `text`, with byte offsets into it (empty without an NER head).
    ///
    /// # Errors
    /// As [`Embedder::embed`].
    pub fn entities(&self, text: &str) -> Result<Vec<Entity>> {
        let states = self.embedder.token_states(&[text])?;
        self.entities_from_states(text, &states[0])
    }

    /// BIO tags for sentences given as words (as in a CoNLL file). Consecutive sentences are
    /// joined into runs of up to the head's `pack_words` words, as in training, so that each
    /// word has article-like context; words are joined by single spaces and encoded. Returns
    /// `O` everywhere without an NER head.
    ///
    /// # Errors
    /// As [`Embedder::embed`].
    pub fn tag_words(&self, sentences: &[Vec<String>]) -> Result<Vec<Vec<Tag>>> {
        let Some((head, card)) = &self.ner else {
            return Ok(sentences.iter().map(|s| vec![Tag::O; s.len()]).collect());
        };
        let counts: Vec<usize> = sentences.iter().map(Vec::len).collect();
        let runs = pack_sentences(&counts, card.pack_words.max(1));
        let mut out = Vec::with_capacity(sentences.len());
        // A few runs per encoder call keeps memory bounded for a whole corpus.
        for group in runs.chunks(16) {
            let run_words: Vec<Vec<String>> = group
                .iter()
                .map(|r| sentences[r.clone()].iter().flatten().cloned().collect())
                .collect();
            let texts: Vec<String> = run_words.iter().map(|w| w.join(" ")).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let states = self.embedder.token_states(&refs)?;
            for ((run, words), state) in group.iter().zip(&run_words).zip(&states) {
                let rows = state.word_states(words, card.token_source, card.word_pooling)?;
                let (tags, _) = head.tag(&rows, words)?;
                let mut tags = tags.into_iter();
                for sentence in &sentences[run.clone()] {
                    let mut t: Vec<Tag> = tags.by_ref().take(sentence.len()).collect();
                    // A run is decoded as one sequence; a sentence still starts afresh.
                    repair_bio(&mut t);
                    out.push(t);
                }
            }
        }
        Ok(out)
    }

    /// Tags the text's words, each sub-token read from the window where it has most context
    /// (so overlapping windows yield no duplicates), and turns tag runs into mentions.
    fn entities_from_states(&self, text: &str, states: &TextStates) -> Result<Vec<Entity>> {
        let Some((head, card)) = &self.ner else {
            return Ok(Vec::new());
        };
        let words = words(text, states);
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let h = card.token_source.width(self.embedder.hidden_size());
        let tables = states
            .windows
            .iter()
            .map(|w| w.states(card.token_source))
            .collect::<Result<Vec<_>>>()?;
        let mut rows: Vec<f32> = Vec::with_capacity(words.len() * h);
        for w in &words {
            let at = rows.len();
            rows.extend(std::iter::repeat_n(0f32, h));
            let take = match card.word_pooling {
                WordPooling::First => 1,
                WordPooling::Mean => w.tokens.len(),
            };
            for &(win, row) in &w.tokens[..take] {
                add_token_state(&tables[win], row, take as f32, &mut rows[at..]);
            }
        }
        let spellings: Vec<&str> = words.iter().map(|w| &text[w.start..w.end]).collect();
        let (tags, scores) = head.tag(&rows, &spellings)?;
        Ok(entity_spans(&tags)
            .into_iter()
            .map(|(a, b, label)| {
                let (start, end) = (words[a].start, words[b - 1].end);
                Entity {
                    text: text[start..end].to_string(),
                    label,
                    start,
                    end,
                    score: scores[a..b].iter().sum::<f32>() / (b - a) as f32,
                }
            })
            .collect())
    }

    /// Scores every sentence alone and keeps the best ones for each label. `sentence_logits`
    /// holds the logits already made for the article scores (per set; empty: not made).
    fn evidence(
        &self,
        sentences: &PieceSentences,
        states: &TextStates,
        sentence_logits: &[Vec<Vec<f32>>],
        labels: &[Theme],
    ) -> Result<Vec<Evidence>> {
        // Each set that has one of the labels scores every sentence once, from rows pooled
        // once per pooling; a set that scores sentences for the article score has its logits
        // already.
        let mut pooled_rows: Vec<Option<Vec<f32>>> = vec![None; self.poolings.len()];
        let mut made_logits: Vec<Option<Vec<Vec<f32>>>> = vec![None; self.sets.len()];
        let mut evidence = Vec::new();
        for theme in labels {
            let Some((s, k)) = self.locate(theme) else {
                continue;
            };
            let set = &self.sets[s];
            let logits = if sentence_logits[s].is_empty() {
                if made_logits[s].is_none() {
                    made_logits[s] =
                        Some(self.score_sentences(set, sentences, states, &mut pooled_rows)?);
                }
                made_logits[s].as_ref().expect("made above")
            } else {
                &sentence_logits[s]
            };
            let mut scored: Vec<(Span, f32)> = sentences
                .spans
                .iter()
                .zip(logits)
                .map(|(&span, l)| (span, sigmoid(l[k])))
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            evidence.extend(scored.into_iter().take(self.evidence_per_theme).map(
                |(span, score)| Evidence {
                    theme: theme.clone(),
                    start: span.start,
                    end: span.end,
                    score,
                },
            ));
        }
        Ok(evidence)
    }

    /// The set that scores `theme` and its output index there.
    fn locate(&self, theme: &Theme) -> Option<(usize, usize)> {
        self.sets.iter().enumerate().find_map(|(s, set)| {
            let k = set.card.labels.iter().position(|t| t == theme)?;
            Some((s, k))
        })
    }
}

/// One theme set loaded: a theme head, its card, and the folder it came from.
#[derive(Debug, Clone)]
struct ThemeSet {
    folder: PathBuf,
    head: ThemeHead,
    card: ThemeCard,
    /// The training windows that vote, when the card blends in their vote.
    neighbours: Option<NeighbourIndex>,
    /// Index of the card's pooling in `Analyzer::poolings`.
    pooled: usize,
}

impl ThemeSet {
    /// Calibrated article scores of the set's themes, by the card's [`Aggregation`]: from the
    /// pooled rows of an article's windows (row-major, `card.input_size` wide) or from its
    /// sentences' logits.
    fn article_probs(&self, window_rows: &[f32], sentence_logits: &[Vec<f32>]) -> Result<Vec<f32>> {
        let width = self.card.input_size;
        let raw = match self.card.aggregation {
            Aggregation::Sentences => {
                sentence_article_probabilities(sentence_logits, self.card.labels.len())
            }
            Aggregation::MeanVector => {
                let mean = mean_row(window_rows, width);
                self.head
                    .probabilities(&mean, width, &Device::Cpu)?
                    .pop()
                    .unwrap_or_else(|| vec![0.0; self.card.labels.len()])
            }
            rule => {
                let window_probs = self.head.probabilities(window_rows, width, &Device::Cpu)?;
                if window_probs.is_empty() {
                    vec![0.0; self.card.labels.len()]
                } else {
                    rule.combine(&window_probs)
                        .expect("a rule over window scores")
                }
            }
        };
        let raw = match &self.neighbours {
            Some(index) => {
                let votes = index.votes(window_rows);
                let vote = article_vote(self.card.aggregation, &votes, raw.len());
                index.settings().blend(&raw, &vote)
            }
            None => raw,
        };
        Ok(self.card.calibrate(raw))
    }
}

/// The sentences of `text` that have tokens (byte spans, in order) and their states pooled by
/// `pooling` (row-major, one row each): what a head with [`Aggregation::Sentences`] scores.
/// `states` must be `text`'s, from an embedder that keeps the layer mean when `pooling`
/// reads one. `train_themes` trains on these rows, so training and the analyzer cannot
/// disagree on them.
///
/// # Panics
/// If `pooling` reads a layer mean that `states` lack.
pub fn pooled_sentences(
    text: &str,
    states: &TextStates,
    pooling: Pooling,
) -> (Vec<Span>, Vec<f32>) {
    let Some(first) = states.windows.first() else {
        return (Vec::new(), Vec::new());
    };
    let sentences = PieceSentences::of(text, states);
    let rows = sentences.pooled_rows(states, pooling, first.hidden.ncols());
    (sentences.spans, rows)
}

/// The sentences of a piece that have tokens, and where each one's tokens are.
struct PieceSentences {
    /// Byte spans into the piece, in order.
    spans: Vec<Span>,
    /// (window, row) of each sentence's tokens, every token from the window that owns it.
    members: Vec<Vec<(usize, usize)>>,
}

impl PieceSentences {
    fn of(text: &str, states: &TextStates) -> Self {
        let sentences = sentence_spans(text);
        let ranges: Vec<_> = states.windows.iter().map(|w| w.content.clone()).collect();
        let owner = owning_window(&ranges, states.content_tokens);
        // Each sentence's tokens as (window, row) pairs; tokens and sentences both ascend.
        let mut members: Vec<Vec<(usize, usize)>> = vec![Vec::new(); sentences.len()];
        let mut s = 0;
        for (t, &w) in owner.iter().enumerate() {
            let window = &states.windows[w];
            let row = window.content_offset + (t - window.content.start);
            let Some(span) = window.spans[row] else {
                continue;
            };
            while s < sentences.len() && sentences[s].end <= span.start {
                s += 1;
            }
            if s == sentences.len() {
                break;
            }
            if span.end > sentences[s].start {
                members[s].push((w, row));
            }
        }
        let (spans, members) = sentences
            .into_iter()
            .zip(members)
            .filter(|(_, m)| !m.is_empty())
            .unzip();
        PieceSentences { spans, members }
    }

    /// Every sentence's states pooled by `pooling`, row-major.
    fn pooled_rows(&self, states: &TextStates, pooling: Pooling, h: usize) -> Vec<f32> {
        let mut rows = Vec::with_capacity(self.members.len() * pooling.output_size(h));
        for members in &self.members {
            // The sentence's token states, from the last layer or the layer mean, without
            // copying them: one closure, so both iterators have one type.
            let states_of = |layer_mean: bool| {
                members.iter().map(move |&(w, row)| {
                    let window = &states.windows[w];
                    // `build` gives the embedder a layer mean whenever a card's pooling reads
                    // one.
                    let table = match layer_mean {
                        true => window
                            .layer_mean
                            .as_ref()
                            .expect("the embedder makes layer means for this pooling"),
                        false => &window.hidden,
                    };
                    table.row(row)
                })
            };
            pooling.pool(
                states_of(false),
                pooling.needs_layer_mean().then(|| states_of(true)),
                h,
                &mut rows,
            );
        }
        rows
    }
}

/// A word: a run of sub-tokens with no gap between them, punctuation on its own.
struct Word {
    start: usize,
    end: usize,
    /// (window, row) of each sub-token, in order.
    tokens: Vec<(usize, usize)>,
}

fn words(text: &str, states: &TextStates) -> Vec<Word> {
    let ranges: Vec<_> = states.windows.iter().map(|w| w.content.clone()).collect();
    let owner = owning_window(&ranges, states.content_tokens);
    let is_punct = |s: &str| !s.is_empty() && s.chars().all(|c| !c.is_alphanumeric());
    let mut words: Vec<Word> = Vec::new();
    let mut prev_punct = false;
    for (t, &w) in owner.iter().enumerate() {
        let window = &states.windows[w];
        let row = window.content_offset + (t - window.content.start);
        let Some(span) = window.spans[row] else {
            continue;
        };
        // XLM-R's lone "▁" token can span nothing or overlap its neighbour: skip it.
        let piece = text[span.range()].trim();
        if piece.is_empty() || words.last().is_some_and(|last| span.start < last.end) {
            continue;
        }
        let punct = is_punct(piece);
        let joins =
            words.last().is_some_and(|last| last.end == span.start) && !punct && !prev_punct;
        if joins {
            let last = words.last_mut().expect("checked above");
            last.end = span.end;
            last.tokens.push((w, row));
        } else {
            words.push(Word {
                start: span.start,
                end: span.end,
                tokens: vec![(w, row)],
            });
        }
        prev_punct = punct;
    }
    words
}

/// Articles tokenised by [`Analyzer::prepare`], ready for [`Analyzer::analyze_prepared`].
#[derive(Debug)]
pub struct PreparedArticles {
    articles: Vec<Article>,
    /// (article, byte range) of every segment, articles in order.
    pieces: Vec<(usize, Range<usize>)>,
    /// Segments encoded together, with their tokens (`None`: not tokenised yet).
    groups: Vec<(Range<usize>, Option<Vec<TokenizedText>>)>,
}

impl PreparedArticles {
    /// The articles, in order.
    pub fn articles(&self) -> &[Article] {
        &self.articles
    }
}

/// What one segment of an article contributes.
struct Partial {
    /// Pooled states of each window, row-major, per distinct pooling of the sets (empty for a
    /// pooling that only sets scoring sentences read).
    window_rows: Vec<Vec<f32>>,
    /// Each sentence's logits, per set (empty for a set that scores windows).
    sentence_logits: Vec<Vec<Vec<f32>>>,
    /// The article's scores (every theme) when the piece is the whole article.
    whole_probs: Option<Vec<f32>>,
    evidence: Vec<Evidence>,
    entities: Vec<Entity>,
    windows: usize,
    tokens: usize,
}

/// Cuts `text` into byte ranges of at most `max` bytes (one range for a shorter text, `0..0`
/// for an empty one), each cut after the last paragraph break, else sentence end, else
/// whitespace in the second half of the range; a text with none of them is cut at a
/// character boundary.
pub fn segment_text(text: &str, max: usize) -> Vec<Range<usize>> {
    let max = max.max(8);
    let mut out = Vec::new();
    let mut start = 0;
    while text.len() - start > max {
        let mut end = start + max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let window = &text[start..end];
        let half = window.len() / 2;
        let after = |i: usize, len: usize| Some(i + len).filter(|_| i >= half);
        let cut = window
            .rfind('\n')
            .and_then(|i| after(i, 1))
            .or_else(|| window.rfind(". ").and_then(|i| after(i, 2)))
            .or_else(|| {
                let (i, c) = window
                    .char_indices()
                    .rev()
                    .find(|(_, c)| c.is_whitespace())?;
                after(i, c.len_utf8())
            })
            .unwrap_or(window.len());
        out.push(start..start + cut);
        start += cut;
    }
    out.push(start..text.len());
    out
}

#[cfg(test)]
mod tests {
    use super::segment_text;

    #[test]
    fn segments_cover_the_text_and_cut_at_breaks() {
        let text = "Eerste zin. Tweede zin.\nDerde alinea hier. En nog één zin met é en ü.";
        for max in [8, 12, 20, 30, 1000] {
            let segs = segment_text(text, max);
            assert_eq!(segs.first().unwrap().start, 0);
            assert_eq!(segs.last().unwrap().end, text.len());
            for pair in segs.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            for s in &segs {
                assert!(s.len() <= max.max(8), "{s:?} over {max}");
                assert!(text.is_char_boundary(s.start) && text.is_char_boundary(s.end));
            }
        }
        // The paragraph break wins over a later sentence end.
        assert_eq!(segment_text(text, 30)[0], 0..24);
        assert_eq!(segment_text("", 10), vec![0..0]);
        // No break at all: a character-boundary cut.
        let arabic = "ببببببببببببببببببببببببب";
        let segs = segment_text(arabic, 9);
        assert!(segs
            .iter()
            .all(|s| arabic.is_char_boundary(s.start) && s.len() <= 9));
    }
}
