//! Shared helpers for the integration tests: the shipped multilingual texts, the default model's
//! folder (tests fail loudly when it is missing), tolerances and vector maths.
#![allow(dead_code)]

use std::path::PathBuf;

use themescan::{Embedder, ModelSource};

/// Embeddings of the same text agree to this cosine across batching and padding.
pub const COS_SAME_TEXT: f32 = 0.9999;
/// Embeddings agree with the reference engine to this cosine.
pub const COS_REFERENCE: f32 = 0.999;

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// One text of `tests/data/multilingual.jsonl` (written by the project).
#[derive(serde::Deserialize, Clone)]
pub struct Text {
    pub id: String,
    pub lang: String,
    pub text: String,
}

pub fn texts() -> Vec<Text> {
    let data = std::fs::read_to_string(repo_path("tests/data/multilingual.jsonl"))
        .expect("tests/data/multilingual.jsonl");
    data.lines()
        .map(|l| serde_json::from_str(l).expect("valid test text"))
        .collect()
}

/// The default model's folder; panics with instructions when it has not been fetched.
pub fn default_model_folder() -> PathBuf {
    let folder = ModelSource::default_folder();
    assert!(
        folder.join("e5-small-q4.bin").is_file() && folder.join("tokenizer.json").is_file(),
        "the default model is missing from {}: run `bash models/fetch.sh` first",
        folder.display()
    );
    folder
}

pub fn default_embedder() -> Embedder {
    Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .threads(2)
        .build()
        .expect("default model loads")
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}

/// An example binary built beside the running test (`cargo test` builds the examples).
pub fn example_binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let bin = deps.parent().unwrap().join("examples").join(name);
    assert!(
        bin.is_file(),
        "{} missing: `cargo test` builds the examples",
        bin.display()
    );
    bin
}
