//! The crate's one error type.
//!
//! Every variant carries the data a user needs to act on it: the path that could not be read,
//! the value that was expected beside the one found, the byte offset where a model file went
//! wrong. Errors from candle and tokenizers are wrapped, not flattened to strings.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in themescan.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A model folder lacks a file it needs, or holds no model this crate can read.
    #[error("{path}: {message}")]
    ModelFolder {
        /// The folder that was searched.
        path: PathBuf,
        /// What was expected there and what was missing.
        message: String,
    },

    /// A model file is malformed: truncated, corrupted or of an unknown layout.
    #[error("{path}: malformed model file at byte {offset}: {message}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// Byte offset where reading failed.
        offset: u64,
        /// What was expected.
        message: String,
    },

    /// `config.json` could not be parsed or describes a model this crate does not run.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A tensor the encoder needs is missing or has the wrong shape.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// Full dotted name of the tensor.
        name: String,
        /// Expected beside found.
        message: String,
    },

    /// The tokenizer could not be loaded or failed on a text.
    #[error("tokenizer: {0}")]
    Tokenizer(#[source] tokenizers::Error),

    /// A builder setting is out of range or conflicts with another.
    #[error("invalid setting: {0}")]
    Setting(String),

    /// An error from the tensor library.
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),

    /// The requested device is not available in this build or on this machine.
    #[error("device `{requested}` is not available: {reason}")]
    Device {
        /// The device that was asked for.
        requested: String,
        /// Why it cannot be used.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
