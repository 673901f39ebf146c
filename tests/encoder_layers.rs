//! Reading and changing the encoder's layers: a layer mean can end at a middle layer (and then
//! equals a truncated encoder's output), fine-tuned layers laid over the shipped model reach
//! both CPU paths, misnamed or misshapen ones are refused, truncation keeps the lower layers
//! exact, the differentiable layer computes what the fused one does and passes gradients, and
//! the analyzer refuses a heads folder whose heads were trained on another encoder.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use themescan::encoder::layers::{attention_bias, layer_tensors, Layer};
use themescan::weights::Checkpoint;
use themescan::{Analyzer, CpuPath, Embedder, Error, ModelSource};

fn checkpoint() -> Checkpoint {
    let files = ModelSource::Folder(default_model_folder())
        .resolve()
        .unwrap();
    Checkpoint::load(&files, &Device::Cpu, DType::F32).unwrap()
}

/// The shipped tensors of layer `i`, by full name, with the output projection scaled.
fn scaled_layer(i: usize, scale: f64) -> HashMap<String, Tensor> {
    let ck = checkpoint();
    let w = ck.root().pp("encoder").pp("layer").pp(i);
    let mut out = HashMap::new();
    for (name, shape) in layer_tensors(ck.config()) {
        let mut t = w.dense_tensor(&name, &shape).unwrap();
        if name == "output.dense.weight" {
            t = (t * scale).unwrap();
        }
        out.insert(format!("encoder.layer.{i}.{name}"), t);
    }
    out
}

fn write(tensors: &HashMap<String, Tensor>, path: &std::path::Path) {
    let f16: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&f16, path).unwrap();
}

fn embed(builder: themescan::EmbedderBuilder, text: &str) -> Vec<f32> {
    let e = builder.threads(2).build().unwrap();
    e.embed(&[text]).unwrap().row(0).to_vec()
}

#[test]
fn layer_mean_can_end_at_a_middle_layer() {
    let text = "Europol en Telegram haalden 300 kanalen van Amaq offline.";
    let build =
        |path: CpuPath, f: &dyn Fn(themescan::EmbedderBuilder) -> themescan::EmbedderBuilder| {
            f(Embedder::builder()
                .model(ModelSource::Folder(default_model_folder()))
                .cpu_path(path)
                .threads(2))
            .build()
            .unwrap()
        };
    for path in [CpuPath::Reference, CpuPath::Int8Portable] {
        // One layer ending at 8 is layer 8's output: what an encoder cut after 8 layers gives.
        let single = build(path, &|b| b.layer_mean(1).layer_mean_ending_at(8));
        let cut = build(path, &|b| b.keep_layers(8));
        let a = single
            .token_states(&[text])
            .unwrap()
            .remove(0)
            .windows
            .remove(0);
        let b = cut
            .token_states(&[text])
            .unwrap()
            .remove(0)
            .windows
            .remove(0);
        let mean = a.layer_mean.expect("a layer mean was asked for");
        assert_eq!(mean, b.hidden, "{path:?}");
        // The last layer's states are untouched by where the mean ends.
        let full = build(path, &|b| b);
        let c = full
            .token_states(&[text])
            .unwrap()
            .remove(0)
            .windows
            .remove(0);
        assert_eq!(a.hidden, c.hidden, "{path:?}");
        assert!(c.layer_mean.is_none(), "no mean unless asked for");
        // Four layers ending at 8 differ from layer 8 alone.
        let four = build(path, &|b| b.layer_mean(4).layer_mean_ending_at(8));
        let d = four
            .token_states(&[text])
            .unwrap()
            .remove(0)
            .windows
            .remove(0);
        assert_ne!(d.layer_mean.unwrap(), b.hidden, "{path:?}");
    }
    for end in [0, 13] {
        let err = Embedder::builder()
            .model(ModelSource::Folder(default_model_folder()))
            .layer_mean(4)
            .layer_mean_ending_at(end)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Setting(_)), "{err}");
    }
}

#[test]
fn replaced_layers_change_both_paths_and_unchanged_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let text = "De politie haalde een kanaal van de beweging offline.";
    let base = || Embedder::builder().model(ModelSource::Folder(default_model_folder()));
    for path in [CpuPath::Reference, CpuPath::Int8Portable] {
        let plain = embed(base().cpu_path(path), text);
        // The shipped values, stored in f16: the output barely moves.
        let same = dir.path().join("same.safetensors");
        write(&scaled_layer(11, 1.0), &same);
        let v = embed(base().cpu_path(path).replace_tensors(&same), text);
        assert!(
            cosine(&plain, &v) > 0.999,
            "{path:?}: {}",
            cosine(&plain, &v)
        );
        // A changed last layer moves it.
        let changed = dir.path().join("changed.safetensors");
        write(&scaled_layer(11, 3.0), &changed);
        let v = embed(base().cpu_path(path).replace_tensors(&changed), text);
        assert!(
            cosine(&plain, &v) < 0.99,
            "{path:?}: {}",
            cosine(&plain, &v)
        );
    }
}

#[test]
fn misnamed_or_misshapen_replacements_are_refused() {
    let mut ck = checkpoint();
    let err = ck
        .replace_tensors(HashMap::from([(
            "encoder.layer.12.output.dense.bias".to_string(),
            Tensor::zeros(384, DType::F32, &Device::Cpu).unwrap(),
        )]))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Tensor { name, .. } if name == "encoder.layer.12.output.dense.bias"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    let mut layer = scaled_layer(3, 1.0);
    layer.insert(
        "encoder.layer.3.output.dense.weight".into(),
        Tensor::zeros((384, 384), DType::F32, &Device::Cpu).unwrap(),
    );
    write(&layer, &bad);
    let err = Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .replace_tensors(&bad)
        .build()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("encoder.layer.3.output.dense.weight") && msg.contains("[384, 1536]"),
        "{msg}"
    );
    let not_safetensors = dir.path().join("junk.safetensors");
    std::fs::write(&not_safetensors, b"not a safetensors file").unwrap();
    let err = Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .replace_tensors(&not_safetensors)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::ModelFile { .. }), "{err}");
}

#[test]
fn kept_layers_feed_the_remaining_ones_to_the_same_output() {
    // Layers 0..10 through the embedder, then 10 and 11 by hand, give the full model's states.
    let text = "Roskomnadzor blokkeerde het kanaal op 3 maart.";
    let lower = Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .cpu_path(CpuPath::Reference)
        .keep_layers(10)
        .threads(2)
        .build()
        .unwrap();
    let full = Embedder::builder()
        .model(ModelSource::Folder(default_model_folder()))
        .cpu_path(CpuPath::Reference)
        .threads(2)
        .build()
        .unwrap();
    let low = &lower.token_states(&[text]).unwrap()[0].windows[0].hidden;
    let want = &full.token_states(&[text]).unwrap()[0].windows[0].hidden;
    let ck = checkpoint();
    let n = low.nrows();
    let mut x = Tensor::from_iter(low.iter().copied(), &Device::Cpu)
        .unwrap()
        .reshape((1, n, 384))
        .unwrap();
    let bias = attention_bias(
        &Tensor::ones((1, n), DType::F32, &Device::Cpu).unwrap(),
        DType::F32,
    )
    .unwrap();
    for i in 10..12 {
        let layer = Layer::load(&ck.root().pp("encoder").pp("layer").pp(i), ck.config()).unwrap();
        x = layer.forward(&x, &bias).unwrap();
    }
    let got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.iter().copied().collect();
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "largest difference {worst}");
    let mut ck = checkpoint();
    assert!(matches!(ck.keep_layers(0), Err(Error::Setting(_))));
    assert!(matches!(ck.keep_layers(13), Err(Error::Setting(_))));
}

#[test]
fn differentiable_layer_matches_and_passes_gradients() {
    let mut ck = checkpoint();
    let vars: HashMap<String, Var> = scaled_layer(11, 1.0)
        .into_iter()
        .map(|(k, t)| (k, Var::from_tensor(&t).unwrap()))
        .collect();
    ck.replace_tensors(
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
    )
    .unwrap();
    let layer = Layer::load(&ck.root().pp("encoder").pp("layer").pp(11), ck.config()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 7, 384), &Device::Cpu).unwrap();
    // The second row has two padding positions.
    let mask = Tensor::new(&[[1f32; 7], [1., 1., 1., 1., 1., 0., 0.]], &Device::Cpu).unwrap();
    let bias = attention_bias(&mask, DType::F32).unwrap();
    let fused: Vec<f32> = layer
        .forward(&x, &bias)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let out = layer.forward_differentiable(&x, &bias).unwrap();
    let plain: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    let worst = fused
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "largest difference {worst}");
    let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn heads_trained_on_another_encoder_are_refused() {
    let shipped = themescan::default_heads_folder();
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let p = entry.unwrap().path();
        if p.extension()
            .is_some_and(|e| e == "json" || e == "safetensors")
        {
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let build = || {
        Analyzer::builder()
            .model(ModelSource::Folder(default_model_folder()))
            .heads(dir.path())
            .threads(2)
            .build()
    };
    assert!(build().is_ok(), "a copy of the shipped heads loads");
    // Other layers than the heads were trained on: refused, naming the fix.
    let layers = dir.path().join(themescan::heads::ENCODER_LAYERS);
    write(&scaled_layer(11, 2.0), &layers);
    let Err(err) = build() else {
        panic!("mismatched layers are refused")
    };
    assert!(
        matches!(err, Error::ModelFolder { .. }) && err.to_string().contains("retrain"),
        "{err}"
    );
    // A head whose card expects fine-tuned layers, in a folder without them: refused too.
    std::fs::remove_file(&layers).unwrap();
    let card_path = dir.path().join(themescan::heads::ner::NER_HEAD_CARD);
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    card["encoder_layers_sha256"] = serde_json::json!("0".repeat(64));
    std::fs::write(&card_path, card.to_string()).unwrap();
    let Err(err) = build() else {
        panic!("missing layers are refused")
    };
    // (The first head named is the NER head with heads trained on the frozen encoder, the
    // theme head with heads shipped with tuned layers: both cards then expect layers.)
    let message = err.to_string();
    assert!(
        matches!(err, Error::ModelFolder { .. })
            && message.contains("was trained on fine-tuned layers")
            && message.contains("the frozen encoder"),
        "{err}"
    );
}

#[test]
fn shipped_tuned_layers_lie_above_what_the_ner_head_reads() {
    // The shipped theme head runs on a tuned layer 12; the NER head beside it was trained on
    // the frozen encoder, which is only right while it reads no tuned layer.
    let shipped = themescan::default_heads_folder();
    let Some(tuned) = themescan::heads::encoder_layers_tuned(&shipped).unwrap() else {
        return; // heads on the frozen encoder: nothing to check
    };
    let card: themescan::heads::ner::NerCard = serde_json::from_str(
        &std::fs::read_to_string(shipped.join(themescan::heads::ner::NER_HEAD_CARD)).unwrap(),
    )
    .unwrap();
    let end = card
        .layers_end
        .expect("a layer mean that stops below the top");
    assert_eq!(card.token_source, themescan::TokenSource::LayerMean);
    assert!(
        *tuned.start() > end,
        "tuned {tuned:?}, NER head reads up to {end}"
    );
    assert_eq!(
        card.encoder_layers_sha256,
        themescan::heads::encoder_layers_sha256(&shipped).unwrap()
    );
}
