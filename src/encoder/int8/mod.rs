//! The CPU fast path: the same encoder with int8 matrix products, on packed sequences.
//!
//! Where the candle path pads every batch to its longest row and runs candle's f32 or Q4_0
//! kernels, this path
//! - concatenates the batch's sequences into one `[tokens, hidden]` matrix, so linear layers
//!   never compute padding and attention runs per sequence ([`attention`]);
//! - quantises each linear layer's weights to `i8` per output row once at load, and its input
//!   activations to `u8` per row on the fly ([`gemm`]), summing products exactly in `i32` with
//!   AVX-512 VNNI where the CPU has it;
//! - runs layer norm, GELU and softmax as vectorised row loops (`ops`), in parallel on the
//!   caller's rayon pool, with the buffers of one forward pass allocated once.
//!
//! Queries are pre-scaled by `1/√head_dim` in the packed weights, and query, key and value are
//! one `[3 · hidden, hidden]` product.

pub mod attention;
pub mod gemm;
pub(crate) mod ops;

use std::ops::Range;

use candle_core::Tensor;
use rayon::prelude::*;

use super::config::{EncoderConfig, HiddenAct};
use crate::error::{Error, Result};
use crate::weights::{EmbeddingTable, MatrixWeight, Weights};
use attention::MultiHeadAttention;
use gemm::{Kernel, PackedMatrix, QuantizedRows};

/// A raw output pointer that parallel tasks share, each writing its own disjoint block (the
/// caller of [`DisjointOut::new`] guarantees that).
#[derive(Clone, Copy)]
pub(crate) struct DisjointOut(*mut f32);
// SAFETY: every user writes blocks no other task touches, while the buffer outlives the tasks.
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        DisjointOut(out.as_mut_ptr())
    }

    /// A method, so that closures capture the wrapper (which is `Send`), not its raw field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows per parallel task in the row-wise passes.
const ROW_CHUNK: usize = 16;

/// Layer-norm parameters on the host.
#[derive(Debug, Clone)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Norm {
    fn load(w: &Weights<'_>, size: usize) -> Result<Self> {
        Ok(Norm {
            weight: host_vector(&w.tensor("weight", &[size])?)?,
            bias: host_vector(&w.tensor("bias", &[size])?)?,
        })
    }
}

/// One transformer layer with packed int8 weights.
#[derive(Debug, Clone)]
struct Int8Layer {
    qkv: PackedMatrix,
    attention_output: PackedMatrix,
    attention_norm: Norm,
    intermediate: PackedMatrix,
    output: PackedMatrix,
    output_norm: Norm,
}

/// The encoder on the int8 CPU path.
#[derive(Debug, Clone)]
pub struct Int8Encoder {
    word: EmbeddingTable,
    /// `[max_position_embeddings, hidden]`.
    position: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: Norm,
    layers: Vec<Int8Layer>,
    config: EncoderConfig,
    eps: f32,
    kernel: Kernel,
    attention: MultiHeadAttention,
}

/// Per-token states of one forward pass, rows packed sequence after sequence.
#[derive(Debug, Clone)]
pub struct PackedStates {
    /// Last layer, `[tokens, hidden]`.
    pub hidden: Vec<f32>,
    /// Mean of the layers `forward` was asked to average, `[tokens, hidden]`; `None` if none.
    pub layer_mean: Option<Vec<f32>>,
}

impl Int8Encoder {
    /// Quantises and packs the checkpoint's linear layers.
    ///
    /// # Errors
    /// [`Error::Tensor`] naming the first missing or misshapen tensor; [`Error::Setting`] for an
    /// activation this path does not implement (only exact GELU is).
    pub fn load(root: &Weights<'_>, config: &EncoderConfig, kernel: Kernel) -> Result<Self> {
        if config.hidden_act != HiddenAct::Gelu {
            return Err(Error::Setting(format!(
                "the int8 CPU path implements exact GELU only, not {:?}",
                config.hidden_act
            )));
        }
        let h = config.hidden_size;
        let ff = config.intermediate_size;
        let e = root.pp("embeddings");
        let token_types =
            host_vector(&e.tensor("token_type_embeddings.weight", &[config.type_vocab_size, h])?)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = root.pp("encoder").pp("layer").pp(i);
                let a = l.pp("attention");
                let scale = 1.0 / (config.head_dim() as f32).sqrt();
                let (mut qkv_w, mut qkv_b) = linear(&a.pp("self").pp("query"), h, h)?;
                for v in qkv_w.iter_mut().chain(qkv_b.iter_mut()) {
                    *v *= scale;
                }
                for name in ["key", "value"] {
                    let (w, b) = linear(&a.pp("self").pp(name), h, h)?;
                    qkv_w.extend(w);
                    qkv_b.extend(b);
                }
                let (ao_w, ao_b) = linear(&a.pp("output").pp("dense"), h, h)?;
                let (in_w, in_b) = linear(&l.pp("intermediate").pp("dense"), ff, h)?;
                let (out_w, out_b) = linear(&l.pp("output").pp("dense"), h, ff)?;
                Ok(Int8Layer {
                    qkv: PackedMatrix::quantize(&qkv_w, &qkv_b, 3 * h, h, kernel),
                    attention_output: PackedMatrix::quantize(&ao_w, &ao_b, h, h, kernel),
                    attention_norm: Norm::load(&a.pp("output").pp("LayerNorm"), h)?,
                    intermediate: PackedMatrix::quantize(&in_w, &in_b, ff, h, kernel),
                    output: PackedMatrix::quantize(&out_w, &out_b, h, ff, kernel),
                    output_norm: Norm::load(&l.pp("output").pp("LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Int8Encoder {
            word: e.embedding_table("word_embeddings.weight", config.vocab_size, h)?,
            position: host_vector(&e.tensor(
                "position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?)?,
            token_type: token_types[..h].to_vec(),
            embedding_norm: Norm::load(&e.pp("LayerNorm"), h)?,
            layers,
            config: config.clone(),
            eps: config.layer_norm_eps as f32,
            kernel,
            attention: MultiHeadAttention::new(
                config.num_attention_heads,
                config.head_dim(),
                kernel,
            ),
        })
    }

    /// The kernel the matrix products use.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// What runs where, for logs: e.g. `int8 (AVX-512 VNNI), attention bf16`.
    pub fn describe(&self) -> String {
        let kernel = match self.kernel {
            Kernel::Vnni => "AVX-512 VNNI",
            Kernel::Portable => "portable",
        };
        let attention = match self.attention.precision() {
            attention::Precision::Bf16 => "bf16",
            attention::Precision::F32 => "f32",
        };
        format!("int8 ({kernel}), attention {attention}")
    }

    /// Runs the encoder over `sequences`, given as `ids` concatenated with their `lengths`.
    /// Parallel work runs on the current rayon pool.
    ///
    /// # Errors
    /// [`Error::Tensor`] for an id outside the vocabulary.
    /// `mean_of`: the layers (0-based) whose outputs are averaged into
    /// [`PackedStates::layer_mean`]; empty for none.
    pub fn forward(
        &self,
        ids: &[u32],
        lengths: &[usize],
        mean_of: Range<usize>,
    ) -> Result<PackedStates> {
        let cfg = &self.config;
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let tokens = ids.len();
        let mut sequences = Vec::with_capacity(lengths.len());
        let mut start = 0;
        for &len in lengths {
            sequences.push(start..start + len);
            start += len;
        }
        debug_assert_eq!(start, tokens);
        let kernel = self.kernel;

        let mut x = self.embed(ids, &sequences)?;
        let mut qkv = vec![0f32; tokens * 3 * h];
        let mut qkv_bf16 = Vec::new();
        let mut context = vec![0f32; tokens * h];
        let mut projected = vec![0f32; tokens * h];
        let mut mid = vec![0f32; tokens * ff];
        let mut quantized = QuantizedRows::default();
        let mut sum: Option<Vec<f32>> = None;

        for (i, layer) in self.layers.iter().enumerate() {
            quantized.quantize(&x, h, kernel);
            gemm::matmul(&quantized, &layer.qkv, &mut qkv, kernel);
            self.attention
                .forward(&qkv, &sequences, &mut context, &mut qkv_bf16);
            quantized.quantize(&context, h, kernel);
            gemm::matmul(&quantized, &layer.attention_output, &mut projected, kernel);
            // x ← LN(projected + x), then quantised for the intermediate product.
            let norm = &layer.attention_norm;
            quantized.prepare(tokens, h);
            x.par_chunks_mut(h * ROW_CHUNK)
                .zip(projected.par_chunks(h * ROW_CHUNK))
                .zip(quantized.rows_mut(ROW_CHUNK))
                .for_each(|((x, p), (q, s))| {
                    let stride = q.len() / s.len();
                    for (((x, p), q), s) in x
                        .chunks_mut(h)
                        .zip(p.chunks(h))
                        .zip(q.chunks_mut(stride))
                        .zip(s.iter_mut())
                    {
                        ops::add_layer_norm(kernel, x, p, &norm.weight, &norm.bias, self.eps);
                        *s = gemm::quantize_row(kernel, x, q);
                    }
                });
            gemm::matmul(&quantized, &layer.intermediate, &mut mid, kernel);
            quantized.prepare(tokens, ff);
            mid.par_chunks_mut(ff * ROW_CHUNK)
                .zip(quantized.rows_mut(ROW_CHUNK))
                .for_each(|(m, (q, s))| {
                    let stride = q.len() / s.len();
                    for ((m, q), s) in m.chunks_mut(ff).zip(q.chunks_mut(stride)).zip(s) {
                        ops::gelu_row(kernel, m);
                        *s = gemm::quantize_row(kernel, m, q);
                    }
                });
            gemm::matmul(&quantized, &layer.output, &mut projected, kernel);
            let norm = &layer.output_norm;
            x.par_chunks_mut(h * ROW_CHUNK)
                .zip(projected.par_chunks(h * ROW_CHUNK))
                .for_each(|(x, p)| {
                    for (x, p) in x.chunks_mut(h).zip(p.chunks(h)) {
                        ops::add_layer_norm(kernel, x, p, &norm.weight, &norm.bias, self.eps);
                    }
                });
            if mean_of.contains(&i) {
                match sum.as_mut() {
                    None => sum = Some(x.clone()),
                    Some(s) => s.par_iter_mut().zip(&x).for_each(|(s, &v)| *s += v),
                }
            }
        }
        let layer_mean = sum.map(|mut s| {
            let inv = 1.0 / mean_of.len() as f32;
            s.par_iter_mut().for_each(|v| *v *= inv);
            s
        });
        Ok(PackedStates {
            hidden: x,
            layer_mean,
        })
    }

    /// Word + position + token-type embeddings, layer-normed: `[tokens, hidden]`.
    fn embed(&self, ids: &[u32], sequences: &[Range<usize>]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let mut x = match &self.word {
            EmbeddingTable::Q4Rows(table) => table.gather(ids)?,
            EmbeddingTable::Dense(table) => {
                if let Some(&bad) = ids
                    .iter()
                    .find(|&&id| id as usize >= self.config.vocab_size)
                {
                    return Err(Error::Tensor {
                        name: "embeddings.word_embeddings.weight".into(),
                        message: format!(
                            "token id {bad} is outside the vocabulary of {} rows",
                            self.config.vocab_size
                        ),
                    });
                }
                let ids = Tensor::from_slice(ids, ids.len(), table.device())?;
                host_vector(&table.index_select(&ids, 0)?.flatten_all()?)?
            }
        };
        let offset = self.config.position_offset;
        for range in sequences {
            for (p, row) in x[range.start * h..range.end * h]
                .chunks_exact_mut(h)
                .enumerate()
            {
                let position = &self.position[(offset + p) * h..(offset + p + 1) * h];
                for ((v, &pos), &t) in row.iter_mut().zip(position).zip(&self.token_type) {
                    *v += pos + t;
                }
            }
        }
        let norm = &self.embedding_norm;
        x.par_chunks_mut(h * ROW_CHUNK).for_each(|rows| {
            for row in rows.chunks_mut(h) {
                ops::layer_norm(self.kernel, row, &norm.weight, &norm.bias, self.eps);
            }
        });
        Ok(x)
    }
}

/// A linear layer's weight `[out, in]` and bias `[out]` as host f32, dequantised if stored Q4_0.
fn linear(w: &Weights<'_>, out_dim: usize, in_dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let weight = match w.matrix("weight", out_dim, in_dim)? {
        MatrixWeight::Dense(t) => t,
        MatrixWeight::Quantized(q) => q.dequantize(&candle_core::Device::Cpu)?,
    };
    Ok((
        host_vector(&weight.flatten_all()?)?,
        host_vector(&w.tensor("bias", &[out_dim])?)?,
    ))
}

fn host_vector(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}
