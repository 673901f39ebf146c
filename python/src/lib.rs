//! `themescan._native`: the crate's [`Analyzer`] and [`Embedder`] for Python.
//!
//! The Python package (`python/themescan/`) wraps these classes; this layer only converts
//! arguments, releases the GIL around the encoder, and turns crate errors into exceptions.
//! An analysis comes back as the JSON text of a `classify` output line, which the Python side
//! parses: one format, the crate's `records::OutputRow`, as the command-line tool writes it.

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use themescan::records::OutputRow;
use themescan::{Analyzer, Article, CpuPath, Embedder, ModelSource};

create_exception!(
    _native,
    ThemescanError,
    PyException,
    "Base class of every error raised by themescan."
);
create_exception!(
    _native,
    ModelError,
    ThemescanError,
    "A model or heads folder is missing, incomplete or not what was expected."
);
create_exception!(
    _native,
    ConfigError,
    ThemescanError,
    "A setting is invalid (CPU path, device, sizes)."
);
create_exception!(
    _native,
    ComputeError,
    ThemescanError,
    "Tokenising or running the encoder failed."
);

/// The crate's error as the matching Python exception, with the crate's message.
fn to_py(e: themescan::Error) -> PyErr {
    use themescan::Error as E;
    let message = e.to_string();
    match e {
        E::Io { .. }
        | E::ModelFolder { .. }
        | E::ModelFile { .. }
        | E::Config { .. }
        | E::Tensor { .. } => ModelError::new_err(message),
        E::Setting(_) | E::Device { .. } => ConfigError::new_err(message),
        _ => ComputeError::new_err(message),
    }
}

fn error_row(id: Option<&str>, error: &str) -> String {
    serde_json::to_string(&OutputRow::failed(id, error)).expect("a row serialises")
}

fn model_source(model: Option<PathBuf>) -> ModelSource {
    model.map_or(ModelSource::Default, ModelSource::Folder)
}

fn cpu_path(name: &str) -> PyResult<CpuPath> {
    name.parse().map_err(to_py)
}

/// The crate's `Analyzer`; see `themescan.Analyzer`.
#[pyclass(frozen, module = "themescan._native")]
struct NativeAnalyzer {
    inner: Analyzer,
}

#[pymethods]
impl NativeAnalyzer {
    #[new]
    #[pyo3(signature = (model=None, heads=None, threads=None, cpu_path="auto", batch_tokens=None, theme_sets=Vec::new()))]
    fn new(
        py: Python<'_>,
        model: Option<PathBuf>,
        heads: Option<PathBuf>,
        threads: Option<usize>,
        cpu_path: &str,
        batch_tokens: Option<usize>,
        theme_sets: Vec<PathBuf>,
    ) -> PyResult<Self> {
        let path = self::cpu_path(cpu_path)?;
        let mut builder = Analyzer::builder()
            .model(model_source(model))
            .embedder(|e| e.cpu_path(path));
        if let Some(h) = heads {
            builder = builder.heads(h);
        }
        for set in theme_sets {
            builder = builder.theme_set(set);
        }
        if let Some(t) = threads {
            builder = builder.threads(t);
        }
        if let Some(b) = batch_tokens {
            builder = builder.batch_tokens(b);
        }
        let inner = py.detach(|| builder.build()).map_err(to_py)?;
        Ok(Self { inner })
    }

    /// One JSON row per input, in order. `ids[i]` and `texts[i]` may be any Python object: a
    /// non-string text, an empty one or one that is not valid Unicode gives a row with `error`
    /// set, never an exception that loses the other rows.
    fn analyze_json(
        &self,
        py: Python<'_>,
        ids: Vec<Bound<'_, PyAny>>,
        texts: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<String>> {
        if ids.len() != texts.len() {
            return Err(ConfigError::new_err(format!(
                "{} ids for {} texts",
                ids.len(),
                texts.len()
            )));
        }
        let ids: Vec<Option<String>> = ids
            .iter()
            .map(|i| {
                if i.is_none() {
                    None
                } else {
                    Some(i.str().map_or_else(|_| String::new(), |s| s.to_string()))
                }
            })
            .collect();
        // Per input: the text to analyse with its warning, or why there is none.
        let mut inputs: Vec<Result<(String, Option<String>), String>> =
            Vec::with_capacity(texts.len());
        for t in &texts {
            inputs.push(if t.is_none() {
                Err("no text (None)".to_string())
            } else if let Ok(s) = t.extract::<String>() {
                if s.trim().is_empty() {
                    Err("empty text".to_string())
                } else {
                    Ok(themescan::records::replace_nuls(s))
                }
            } else if t.is_instance_of::<pyo3::types::PyString>() {
                Err("the text is not valid Unicode (lone surrogates)".to_string())
            } else {
                let kind = t
                    .get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string());
                Err(format!("`text` must be a string, found {kind}"))
            });
        }
        let analyzer = &self.inner;
        let rows = py.detach(|| {
            let good: Vec<(usize, Article)> = inputs
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let (text, _) = r.as_ref().ok()?;
                    let id = ids[i].clone().unwrap_or_else(|| i.to_string());
                    Some((i, Article::new(id, text.clone())))
                })
                .collect();
            let articles: Vec<Article> = good.iter().map(|(_, a)| a.clone()).collect();
            // One call packs every window into shared encoder batches; should it fail, each
            // article is analysed alone so that one bad record costs only its own row.
            let results: Vec<Result<themescan::Analysis, String>> =
                match analyzer.analyze_many(&articles) {
                    Ok(all) => all.into_iter().map(Ok).collect(),
                    Err(_) => articles
                        .iter()
                        .map(|a| analyzer.analyze(a).map_err(|e| e.to_string()))
                        .collect(),
                };
            let mut rows = vec![String::new(); inputs.len()];
            for ((i, _), result) in good.iter().zip(results) {
                let warning = inputs[*i].as_ref().ok().and_then(|(_, w)| w.as_deref());
                rows[*i] = match result {
                    Ok(a) => serde_json::to_string(&OutputRow {
                        id: ids[*i].as_deref(),
                        themes: &a.themes,
                        labels: &a.labels,
                        evidence: &a.evidence,
                        entities: &a.entities,
                        error: warning,
                    })
                    .expect("a row serialises"),
                    Err(e) => error_row(ids[*i].as_deref(), &e),
                };
            }
            for (i, input) in inputs.iter().enumerate() {
                if let Err(e) = input {
                    rows[i] = error_row(ids[i].as_deref(), e);
                }
            }
            rows
        });
        Ok(rows)
    }

    /// Seconds the crate's own `Analyzer::analyze_many` takes on `texts`, with no Python
    /// conversion at all (the GIL released): the reference that the binding's overhead is
    /// measured against (`python/benches/binding_overhead.py`).
    fn time_crate_analyze_many(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<f64> {
        let articles: Vec<Article> = texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| Article::new(i.to_string(), t))
            .collect();
        let analyzer = &self.inner;
        py.detach(|| {
            let started = std::time::Instant::now();
            analyzer.analyze_many(&articles)?;
            Ok(started.elapsed().as_secs_f64())
        })
        .map_err(to_py)
    }

    /// Every theme of every loaded theme set, in score order.
    fn theme_labels(&self) -> Vec<String> {
        self.inner
            .themes()
            .iter()
            .map(|t| t.as_str().to_string())
            .collect()
    }

    /// What the encoder runs on, e.g. `int8 (AVX-512 VNNI), attention bf16`.
    fn describe_compute(&self) -> String {
        self.inner.embedder().describe_compute()
    }
}

/// The crate's `Embedder`; see `themescan.Embedder`.
#[pyclass(frozen, module = "themescan._native")]
struct NativeEmbedder {
    inner: Embedder,
}

#[pymethods]
impl NativeEmbedder {
    #[new]
    #[pyo3(signature = (model=None, threads=None, cpu_path="auto", batch_tokens=None))]
    fn new(
        py: Python<'_>,
        model: Option<PathBuf>,
        threads: Option<usize>,
        cpu_path: &str,
        batch_tokens: Option<usize>,
    ) -> PyResult<Self> {
        let mut builder = Embedder::builder()
            .model(model_source(model))
            .cpu_path(self::cpu_path(cpu_path)?);
        if let Some(t) = threads {
            builder = builder.threads(t);
        }
        if let Some(b) = batch_tokens {
            builder = builder.batch_tokens(b);
        }
        let inner = py.detach(|| builder.build()).map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Row-major little-endian float32 bytes of the `len(texts) × hidden` embeddings, and the
    /// hidden size; the Python side views them as a NumPy array without copying.
    fn embed_bytes<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize)> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let inner = &self.inner;
        let array = py.detach(|| inner.embed(&refs)).map_err(to_py)?;
        let hidden = array.ncols();
        let bytes: Vec<u8> = array.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok((PyBytes::new(py, &bytes), hidden))
    }

    /// Width of an embedding.
    fn hidden_size(&self) -> usize {
        self.inner.hidden_size()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<NativeAnalyzer>()?;
    m.add_class::<NativeEmbedder>()?;
    m.add("ThemescanError", py.get_type::<ThemescanError>())?;
    m.add("ModelError", py.get_type::<ModelError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ComputeError", py.get_type::<ComputeError>())?;
    Ok(())
}
