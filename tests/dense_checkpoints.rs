//! The dense path: tiny random BERT and XLM-RoBERTa checkpoints (made by
//! `tests/fixtures/tiny/make_tiny.py`) agree with PyTorch + transformers; f16/bf16 files load;
//! the hub-cache source finds a cache the test builds; bad folders give clear errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::repo_path;
use themescan::batch::Batch;
use themescan::encoder::Encoder;
use themescan::weights::{Checkpoint, ModelSource};
use themescan::{CpuPath, Embedder, Error};

/// Agreement with the PyTorch reference in f32.
const MAX_ABS_F32: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Reference {
    ids: Vec<Vec<u32>>,
    models: std::collections::HashMap<String, Vec<Vec<Vec<f32>>>>,
}

fn reference() -> Reference {
    serde_json::from_str(
        &std::fs::read_to_string(repo_path("tests/fixtures/tiny/reference.json")).unwrap(),
    )
    .unwrap()
}

fn tiny(name: &str) -> PathBuf {
    repo_path("tests/fixtures/tiny").join(name)
}

/// Runs the encoder on the reference batch and returns the largest absolute difference.
fn max_abs_error(folder: &Path, weights: &Path, model: &str, dtype: DType) -> f32 {
    let reference = reference();
    let checkpoint =
        Checkpoint::load_safetensors(&folder.join("config.json"), weights, &Device::Cpu, dtype)
            .unwrap();
    // The dense path is what these tolerances are for; the int8 path is measured against it.
    let encoder = Encoder::load_with(&checkpoint, CpuPath::Reference).unwrap();
    let batch = Batch::new(&reference.ids, encoder.config().pad_token_id);
    let hidden: Vec<Vec<Vec<f32>>> = encoder
        .forward(&batch)
        .unwrap()
        .hidden_rows(batch.lengths())
        .unwrap()
        .into_iter()
        .map(|rows| rows.outer_iter().map(|r| r.to_vec()).collect())
        .collect();
    let want = &reference.models[model];
    let mut worst = 0f32;
    for (row, (got, want)) in hidden.iter().zip(want).enumerate() {
        assert_eq!(want.len(), batch.lengths()[row]);
        for (g, w) in got.iter().zip(want) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    worst
}

/// Issue 2, 7b: the Rust forward agrees with transformers to 1e-4 on a padded batch.
#[test]
fn tiny_bert_and_xlm_roberta_agree_with_transformers() {
    for model in ["bert", "xlm-roberta"] {
        let folder = tiny(model);
        let err = max_abs_error(
            &folder,
            &folder.join("model.safetensors"),
            model,
            DType::F32,
        );
        eprintln!("{model}: max abs error vs transformers {err:.2e}");
        assert!(
            err <= MAX_ABS_F32,
            "{model}: max abs error {err} over {MAX_ABS_F32}"
        );
    }
}

/// Checkpoints stored in f16 or bf16 load and stay close (the rounding of the weights is the
/// only difference); computing in f16/bf16 also works.
#[test]
fn half_precision_checkpoints_load() {
    let dir = tempfile::tempdir().unwrap();
    for (stored, tolerance) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
        let folder = tiny("xlm-roberta");
        let tensors =
            candle_core::safetensors::load(folder.join("model.safetensors"), &Device::Cpu).unwrap();
        let converted: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(stored).unwrap()))
            .collect();
        let path = dir.path().join(format!("{stored:?}.safetensors"));
        candle_core::safetensors::save(&converted, &path).unwrap();
        for compute in [DType::F32, stored] {
            let err = max_abs_error(&folder, &path, "xlm-roberta", compute);
            eprintln!("stored {stored:?}, computed {compute:?}: max abs error {err:.2e}");
            assert!(
                err <= tolerance,
                "stored {stored:?} computed {compute:?}: {err}"
            );
        }
    }
}

/// The same tiny BERT through candle-transformers' own BertModel: an independent second
/// implementation on the same weights.
#[test]
fn tiny_bert_agrees_with_candle_transformers() {
    use candle_transformers::models::bert::{BertModel, Config};
    let folder = tiny("bert");
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
            .unwrap();
    let data = std::fs::read(folder.join("model.safetensors")).unwrap();
    let vb =
        candle_nn::VarBuilder::from_buffered_safetensors(data, DType::F32, &Device::Cpu).unwrap();
    let theirs = BertModel::load(vb, &config).unwrap();
    let reference = reference();
    let checkpoint = Checkpoint::load_safetensors(
        &folder.join("config.json"),
        &folder.join("model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let ours = Encoder::load_with(&checkpoint, CpuPath::Reference).unwrap();
    for ids in &reference.ids {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let types = input.zeros_like().unwrap();
        let want = theirs.forward(&input, &types, None).unwrap();
        let rows = ours
            .forward(&Batch::new(&[ids], 1))
            .unwrap()
            .hidden_rows(&[ids.len()])
            .unwrap()
            .remove(0);
        let shape = (1, rows.nrows(), rows.ncols());
        let got = Tensor::from_vec(rows.into_raw_vec_and_offset().0, shape, &Device::Cpu).unwrap();
        let diff: f32 = (want - got)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff <= MAX_ABS_F32, "diff {diff}");
    }
}

/// Builds a hub cache folder by hand (refs/main → snapshot) holding the tiny XLM-R model.
fn build_hub_cache(root: &Path, repo_id: &str) {
    let repo_dir = root.join(format!("models--{}", repo_id.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), commit).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny("xlm-roberta").join(file), snapshot.join(file)).unwrap();
    }
}

/// The hf-hub code path finds a model in a cache folder, offline, and gives the same vectors
/// as the plain folder; a repository missing from the cache is a clear error.
#[test]
fn hub_cache_source_loads_offline() {
    let cache = tempfile::tempdir().unwrap();
    build_hub_cache(cache.path(), "themescan/tiny-xlm-roberta");
    let texts = [
        "the police said the court was in the city",
        "في المدينة",
        "",
    ];
    let from = |source: ModelSource| {
        Embedder::builder()
            .model(source)
            .text_prefix("")
            .threads(1)
            .build()
            .unwrap()
            .embed(&texts)
            .unwrap()
    };
    let hub = from(ModelSource::HubCache {
        cache_dir: cache.path().into(),
        repo_id: "themescan/tiny-xlm-roberta".into(),
        revision: "main".into(),
    });
    let folder = from(ModelSource::Folder(tiny("xlm-roberta")));
    assert_eq!(hub, folder);
    assert_eq!(hub.dim(), (3, 32));

    let err = Embedder::builder()
        .model(ModelSource::HubCache {
            cache_dir: cache.path().into(),
            repo_id: "themescan/absent".into(),
            revision: "main".into(),
        })
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("themescan/absent") && err.contains("nothing is downloaded"),
        "{err}"
    );
}

/// Wrong or incomplete folders are reported with the folder and what was expected.
#[test]
fn bad_model_folders_are_clear_errors() {
    let build = |dir: &Path| {
        Embedder::builder()
            .model(ModelSource::Folder(dir.into()))
            .text_prefix("")
            .build()
            .unwrap_err()
    };

    let missing = build(Path::new("/nonexistent/model"));
    assert!(
        missing
            .to_string()
            .contains("/nonexistent/model: no such folder"),
        "{missing}"
    );

    let empty = tempfile::tempdir().unwrap();
    let err = build(empty.path()).to_string();
    assert!(
        err.contains("holds no model") && err.contains("config.json"),
        "{err}"
    );

    let copy = |files: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            std::fs::copy(tiny("bert").join(f), dir.path().join(f)).unwrap();
        }
        dir
    };
    let no_tokenizer = copy(&["config.json", "model.safetensors"]);
    assert!(build(no_tokenizer.path())
        .to_string()
        .contains("no `tokenizer.json`"));

    let bad_config = copy(&["model.safetensors", "tokenizer.json"]);
    std::fs::write(
        bad_config.path().join("config.json"),
        "{\"hidden_size\": 32,\n oops",
    )
    .unwrap();
    let err = build(bad_config.path());
    assert!(
        matches!(err, Error::Config { .. }) && err.to_string().contains("line 2"),
        "{err}"
    );

    let gpt = copy(&["model.safetensors", "tokenizer.json"]);
    let config = std::fs::read_to_string(tiny("bert").join("config.json"))
        .unwrap()
        .replace("\"bert\"", "\"gpt2\"");
    std::fs::write(gpt.path().join("config.json"), config).unwrap();
    assert!(build(gpt.path())
        .to_string()
        .contains("model_type `gpt2` is not supported"));

    let garbage = copy(&["config.json", "tokenizer.json"]);
    std::fs::write(
        garbage.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
    )
    .unwrap();
    let err = build(garbage.path());
    assert!(
        matches!(err, Error::ModelFile { .. }) && err.to_string().contains("safetensors"),
        "{err}"
    );

    // A checkpoint whose config disagrees with its tensors names the tensor.
    let wrong = copy(&["model.safetensors", "tokenizer.json"]);
    let config = std::fs::read_to_string(tiny("bert").join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 32", "\"hidden_size\": 64");
    std::fs::write(wrong.path().join("config.json"), config).unwrap();
    let err = build(wrong.path());
    assert!(
        matches!(err, Error::Tensor { .. }) && err.to_string().contains("embeddings."),
        "{err}"
    );
}
