//! The encoder's top layers as trainable variables: what fine-tuning updates and then saves as
//! `encoder-layers.safetensors` beside a head (see [`crate::heads::ENCODER_LAYERS`]).
//!
//! Fine-tuning runs the frozen lower layers once (on any path) and trains only the top ones, so
//! this holds just those: each of their tensors as a [`Var`] laid over the checkpoint with
//! [`Checkpoint::replace_tensors`], and the [`Layer`]s built from them, whose
//! [`Layer::forward_differentiable`] lets gradients reach the variables.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use super::layers::{layer_tensors, Layer};
use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// The top layers of an encoder, from [`TrainableLayers::first`] to the last, as trainable
/// variables initialised from a checkpoint's weights.
///
/// ```no_run
/// use themescan::encoder::trainable::TrainableLayers;
/// use themescan::weights::Checkpoint;
/// use themescan::{DType, Device, ModelSource};
///
/// let files = ModelSource::Default.resolve()?;
/// let checkpoint = Checkpoint::load(&files, &Device::Cpu, DType::F32)?;
/// let top = TrainableLayers::top(checkpoint, 2)?;
/// assert_eq!(top.first(), 10); // layers 11 and 12 of a 12-layer encoder
/// // ... run `top.layers()` on the frozen layers' output, step an optimiser over
/// // `top.vars()`, then:
/// top.save_f16(std::path::Path::new("heads/encoder-layers.safetensors"))?;
/// # Ok::<(), themescan::Error>(())
/// ```
#[derive(Debug)]
pub struct TrainableLayers {
    first: usize,
    layers: Vec<Layer>,
    vars: Vec<(String, Var)>,
}

impl TrainableLayers {
    /// Makes the top `count` layers of `checkpoint` trainable. Their weights are read dense in
    /// the checkpoint's dtype (a Q4_0 matrix is dequantised), so load it as `F32` to train.
    ///
    /// # Errors
    /// [`Error::Setting`] unless `1 <= count < ` the encoder's layer count (at least one layer
    /// must stay frozen below: fine-tuning reads its output); [`Error::Tensor`] for a missing or
    /// misshapen tensor.
    pub fn top(mut checkpoint: Checkpoint, count: usize) -> Result<Self> {
        let cfg = checkpoint.config().clone();
        let total = cfg.num_hidden_layers;
        if count == 0 || count >= total {
            return Err(Error::Setting(format!(
                "can tune between 1 and {} layers of a {total}-layer encoder: found {count}",
                total.saturating_sub(1)
            )));
        }
        let first = total - count;
        let mut vars = Vec::new();
        for i in first..total {
            let weights = checkpoint.root().pp("encoder").pp("layer").pp(i);
            for (name, shape) in layer_tensors(&cfg) {
                let value = weights.dense_tensor(&name, &shape)?;
                vars.push((
                    format!("encoder.layer.{i}.{name}"),
                    Var::from_tensor(&value)?,
                ));
            }
        }
        checkpoint.replace_tensors(
            vars.iter()
                .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
                .collect(),
        )?;
        let layers = (first..total)
            .map(|i| Layer::load(&checkpoint.root().pp("encoder").pp("layer").pp(i), &cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(TrainableLayers {
            first,
            layers,
            vars,
        })
    }

    /// How many layers stay frozen below: the index of the first trainable layer, counting
    /// from 0 (10 for the top two of twelve).
    pub fn first(&self) -> usize {
        self.first
    }

    /// The trainable layers, lowest first; their weights are the [`TrainableLayers::vars`].
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Every variable with its full Hugging Face name (`encoder.layer.11.output.dense.weight`),
    /// for an optimiser and for checkpoints.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The variables' current values by full name, converted to `dtype`.
    ///
    /// # Errors
    /// [`Error::Candle`] if a conversion fails.
    pub fn tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(dtype)?)))
            .collect()
    }

    /// Writes the layers in f16 to `path` as safetensors, the form
    /// [`Checkpoint::replace_tensors_from`] reads back over the shipped checkpoint.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn save_f16(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.tensors(DType::F16)?, path)
            .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::encoder::layers::attention_bias;

    /// The tiny random BERT of the dense-path tests: two layers, hidden size 32.
    fn tiny_bert() -> Checkpoint {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/bert");
        Checkpoint::load_safetensors(
            &folder.join("config.json"),
            &folder.join("model.safetensors"),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
    }

    #[test]
    fn the_top_layer_starts_as_the_checkpoints_and_trains_through_its_vars() {
        let top = TrainableLayers::top(tiny_bert(), 1).unwrap();
        assert_eq!((top.first(), top.layers().len()), (1, 1));
        let cfg = tiny_bert().config().clone();
        assert_eq!(top.vars().len(), layer_tensors(&cfg).len());
        assert!(top
            .vars()
            .iter()
            .all(|(name, _)| name.starts_with("encoder.layer.1.")));

        let frozen_checkpoint = tiny_bert();
        let frozen = Layer::load(
            &frozen_checkpoint.root().pp("encoder").pp("layer").pp(1),
            &cfg,
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5, 32), &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let bias = attention_bias(&mask, DType::F32).unwrap();
        let want = frozen.forward(&x, &bias).unwrap();
        let got = top.layers()[0].forward_differentiable(&x, &bias).unwrap();
        let gap = (want - &got).unwrap().abs().unwrap().max_all().unwrap();
        assert!(gap.to_scalar::<f32>().unwrap() < 1e-4);

        // Gradients reach every variable, and a changed variable changes the layer's output.
        let grads = got.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in top.vars() {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "no gradient for {name}"
            );
        }
        let (name, var) = top
            .vars()
            .iter()
            .find(|(name, _)| name.ends_with("intermediate.dense.bias"))
            .unwrap();
        var.set(&(var.as_tensor() + 1.0).unwrap()).unwrap();
        let moved = top.layers()[0].forward_differentiable(&x, &bias).unwrap();
        let change = (moved - got).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            change.to_scalar::<f32>().unwrap() > 1e-3,
            "{name} did not reach the layer"
        );
        assert_eq!(
            top.tensors(DType::F16).unwrap()[name.as_str()].dtype(),
            DType::F16
        );
    }

    #[test]
    fn refuses_to_tune_no_layer_or_every_layer() {
        for count in [0, 2, 3] {
            let err = TrainableLayers::top(tiny_bert(), count).unwrap_err();
            assert!(
                matches!(&err, Error::Setting(m) if m.contains("between 1 and 1")),
                "{count}: {err}"
            );
        }
    }
}
