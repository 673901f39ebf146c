//! Writes the default encoder as a Hugging Face BERT checkpoint (`config.json`,
//! `model.safetensors` in f32, `tokenizer.json`), with every Q4_0 tensor dequantised to the exact
//! values the library computes with. Peers that need a dense checkpoint (PyTorch +
//! transformers, an ONNX export) load this folder, so a comparison runs the same weights.
//!
//! ```text
//! cargo run --release --example export -- --out target/e5-small-dense
//! ```
//! The folder also loads back into themescan with `ModelSource::Folder`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use themescan::weights::{Checkpoint, EmbeddingTable, MatrixWeight, Weights};
use themescan::ModelSource;

#[derive(Parser)]
#[command(about = "Export the default encoder as a dense Hugging Face BERT checkpoint")]
struct Args {
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let files = ModelSource::Default.resolve()?;
    let checkpoint = Checkpoint::load(&files, &Device::Cpu, DType::F32)?;
    let cfg = checkpoint.config().clone();
    anyhow::ensure!(
        cfg.position_offset == 0,
        "only BERT-style position numbering is exported"
    );
    let root = checkpoint.root();
    let h = cfg.hidden_size;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        tensors.insert(name, t);
    };
    let dense = |w: &Weights<'_>, name: &str, out: usize, inp: usize| -> anyhow::Result<Tensor> {
        match w.matrix(name, out, inp)? {
            MatrixWeight::Dense(t) => Ok(t),
            MatrixWeight::Quantized(q) => Ok(q.dequantize(&Device::Cpu)?),
        }
    };

    let e = root.pp("embeddings");
    let word = match e.embedding_table("word_embeddings.weight", cfg.vocab_size, h)? {
        EmbeddingTable::Dense(t) => t,
        EmbeddingTable::Q4Rows(q) => {
            let ids: Vec<u32> = (0..cfg.vocab_size as u32).collect();
            Tensor::from_vec(q.gather(&ids)?, (cfg.vocab_size, h), &Device::Cpu)?
        }
    };
    put("embeddings.word_embeddings.weight".into(), word);
    for (name, rows) in [
        ("position_embeddings.weight", cfg.max_position_embeddings),
        ("token_type_embeddings.weight", cfg.type_vocab_size),
    ] {
        put(format!("embeddings.{name}"), e.tensor(name, &[rows, h])?);
    }
    for p in ["weight", "bias"] {
        put(
            format!("embeddings.LayerNorm.{p}"),
            e.pp("LayerNorm").tensor(p, &[h])?,
        );
    }
    let ff = cfg.intermediate_size;
    for i in 0..cfg.num_hidden_layers {
        let l = root.pp("encoder").pp("layer").pp(i);
        let linears = [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ff, h),
            ("output.dense", h, ff),
        ];
        for (name, out, inp) in linears {
            let w = l.pp(name);
            let prefix = format!("encoder.layer.{i}.{name}");
            put(format!("{prefix}.weight"), dense(&w, "weight", out, inp)?);
            put(format!("{prefix}.bias"), w.tensor("bias", &[out])?);
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            for p in ["weight", "bias"] {
                put(
                    format!("encoder.layer.{i}.{name}.{p}"),
                    l.pp(name).tensor(p, &[h])?,
                );
            }
        }
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    candle_core::safetensors::save(&tensors, args.out.join("model.safetensors"))?;
    let act = match cfg.hidden_act {
        themescan::encoder::HiddenAct::Gelu => "gelu",
        themescan::encoder::HiddenAct::GeluTanh => "gelu_new",
        themescan::encoder::HiddenAct::Relu => "relu",
    };
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": h,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": ff,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": act,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "torch_dtype": "float32",
    });
    std::fs::write(
        args.out.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    std::fs::copy(&files.tokenizer, args.out.join("tokenizer.json"))?;
    eprintln!("wrote {} tensors to {}", tensors.len(), args.out.display());
    Ok(())
}
