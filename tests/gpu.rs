//! The CUDA backend (built with `--features cuda`): the encoder on a GPU agrees with the CPU
//! reference path, the analyzer gives the same labels on both, long and padded batches under a
//! GPU-sized budget cover every token, and f16/bf16 dense weights run. Without a CUDA device
//! every test prints why it skipped; `THEMESCAN_REQUIRE_GPU=1` (set by the GPU benchmark
//! script) makes a missing device a failure instead.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;

use common::*;
use themescan::{Analyzer, Article, CpuPath, DType, Device, Embedder, ModelSource};

fn cuda(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            let reason = format!("{test}: no CUDA device ({e})");
            if std::env::var("THEMESCAN_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{reason}, and THEMESCAN_REQUIRE_GPU=1 makes it required");
            }
            eprintln!("skipped {reason}");
            None
        }
    }
}

/// The 24 test texts and the shipped sample articles.
fn all_texts() -> Vec<String> {
    let mut out: Vec<String> = texts().into_iter().map(|t| t.text).collect();
    let sample = std::fs::read_to_string(repo_path("examples/data/sample.jsonl")).unwrap();
    for line in sample.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(t) = v["text"].as_str() {
            out.push(t.to_string());
        }
    }
    out
}

fn cpu_reference() -> Embedder {
    Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .cpu_path(CpuPath::Reference)
        .threads(2)
        .build()
        .unwrap()
}

fn assert_close(a: &Embedder, b: &Embedder, min_cos: f32, what: &str) {
    let texts = all_texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (x, y) = (a.embed(&refs).unwrap(), b.embed(&refs).unwrap());
    let mut worst = 1f32;
    for (r, (u, v)) in x.outer_iter().zip(y.outer_iter()).enumerate() {
        let c = cosine(u.as_slice().unwrap(), v.as_slice().unwrap());
        assert!(c >= min_cos, "{what}: text {r} cos {c}");
        worst = worst.min(c);
    }
    eprintln!("{what}: min cos {worst:.6} over {} texts", texts.len());
}

#[test]
fn cuda_encoder_agrees_with_the_cpu_reference_path() {
    let Some(device) = cuda("cuda_encoder_agrees_with_the_cpu_reference_path") else {
        return;
    };
    let gpu = Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .device(device)
        .build()
        .unwrap();
    assert_close(&gpu, &cpu_reference(), 0.999, "cuda f32 vs cpu reference");
}

#[test]
fn cuda_analyzer_gives_the_cpu_labels() {
    let Some(device) = cuda("cuda_analyzer_gives_the_cpu_labels") else {
        return;
    };
    let mut articles: Vec<Article> = all_texts()
        .into_iter()
        .enumerate()
        .map(|(i, t)| Article::new(format!("t{i}"), t))
        .collect();
    if let Some(seeds) = shared_data("cuda_analyzer_gives_the_cpu_labels", "seeds/articles.jsonl") {
        for line in std::fs::read_to_string(seeds).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            articles.push(Article::new(
                v["id"].as_str().unwrap(),
                v["text"].as_str().unwrap(),
            ));
        }
    }
    let cpu = Analyzer::builder()
        .embedder(|e| e.cpu_path(CpuPath::Reference))
        .threads(2)
        .build()
        .unwrap();
    let gpu = Analyzer::builder().device(device).build().unwrap();
    let (a, b) = (
        cpu.analyze_many(&articles).unwrap(),
        gpu.analyze_many(&articles).unwrap(),
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.labels, y.labels,
            "{}: cpu {:?} gpu {:?}",
            x.id, x.themes, y.themes
        );
        assert_eq!(x.tokens, y.tokens);
    }
}

#[test]
fn cuda_long_texts_and_padding_under_a_gpu_budget() {
    let Some(device) = cuda("cuda_long_texts_and_padding_under_a_gpu_budget") else {
        return;
    };
    // A ~6,000-token text beside short ones: many windows and heavy padding in one batch.
    let long = texts()
        .into_iter()
        .find(|t| t.id == "nl-long")
        .unwrap()
        .text
        .repeat(3);
    let short = "Kort bericht.".to_string();
    let inputs = [long.as_str(), short.as_str(), long.as_str()];
    let gpu = Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .device(device)
        .batch_tokens(65_536)
        .build()
        .unwrap();
    let cpu = cpu_reference();
    let (g, c) = (
        gpu.token_states(&inputs).unwrap(),
        cpu.token_states(&inputs).unwrap(),
    );
    for (x, y) in g.iter().zip(&c) {
        assert_eq!(x.windows.len(), y.windows.len());
        assert_eq!(x.content_tokens, y.content_tokens);
        let cos = cosine(
            x.embedding.as_slice().unwrap(),
            y.embedding.as_slice().unwrap(),
        );
        assert!(cos >= 0.999, "cos {cos}");
    }
}

#[test]
fn cuda_runs_f16_and_bf16_dense_weights() {
    let Some(device) = cuda("cuda_runs_f16_and_bf16_dense_weights") else {
        return;
    };
    // The default encoder as a dense checkpoint, written by the export example.
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(example_binary("export"))
        .args(["--out", dir.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let folder: PathBuf = dir.path().to_path_buf();
    let reference = cpu_reference();
    for dtype in [DType::F16, DType::BF16] {
        let gpu = Embedder::builder()
            .model(ModelSource::Folder(folder.clone()))
            .device(device.clone())
            .dtype(dtype)
            .build()
            .unwrap();
        assert_close(&gpu, &reference, 0.99, &format!("cuda {dtype:?}"));
    }
}
