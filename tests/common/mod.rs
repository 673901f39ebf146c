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

/// Set to `1` (as `.ci/run` does) to make a test fail, not skip, when data that lives beside
/// the repository (`../shared/seeds`, `../shared/ner-data`) is missing.
pub const REQUIRE_SHARED_VAR: &str = "THEMESCAN_REQUIRE_SHARED";

/// A path under `../shared` beside the repository, or `None` with a printed reason when it is
/// absent (a lone clone has no `../shared`); panics instead when [`REQUIRE_SHARED_VAR`] is `1`,
/// so CI can never skip such a test silently.
pub fn shared_data(test: &str, rel: &str) -> Option<PathBuf> {
    let path = repo_path("..").join("shared").join(rel);
    if path.exists() {
        return Some(path);
    }
    let reason = format!(
        "{test}: {} is not there (it lives beside the repository, in ../shared)",
        path.display()
    );
    if std::env::var(REQUIRE_SHARED_VAR).is_ok_and(|v| v == "1") {
        panic!("{reason}, and {REQUIRE_SHARED_VAR}=1 makes it required");
    }
    eprintln!("skipped {reason}");
    None
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
