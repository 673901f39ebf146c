//! Checkpoints of a fine-tuning run, so that a run stopped at any moment goes on where it left
//! off: the trainable tensors, the optimiser's moments, and where in which epoch it was.
//!
//! candle-nn's `AdamW` keeps its moments private, so the run uses [`AdamW`] here: the same
//! update (decoupled weight decay, bias-corrected moments) with state that can be saved.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// AdamW over named variables, with moments that a checkpoint can hold.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    steps: usize,
    pub lr: f64,
    weight_decay: f64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(AdamW {
            first: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?,
            second: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<Result<_, _>>()?,
            vars,
            steps: 0,
            lr,
            weight_decay,
        })
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let (correct1, correct2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            let m = ((&self.first[i] * BETA1)? + (g * (1.0 - BETA1))?)?;
            let v = ((&self.second[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let update = ((&m / correct1)? / ((&v / correct2)?.sqrt()? + EPS)?)?;
            let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            var.set(&(decayed - (update * self.lr)?)?)?;
            self.first[i] = m;
            self.second[i] = v;
        }
        Ok(())
    }

    /// Variables and moments under `prefix`.
    fn tensors(&self, prefix: &str, out: &mut HashMap<String, Tensor>) {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            out.insert(format!("{prefix}.var.{name}"), var.as_tensor().clone());
            out.insert(format!("{prefix}.m.{name}"), self.first[i].clone());
            out.insert(format!("{prefix}.v.{name}"), self.second[i].clone());
        }
    }

    fn restore(
        &mut self,
        prefix: &str,
        saved: &HashMap<String, Tensor>,
        steps: usize,
    ) -> Result<()> {
        let get = |key: String| {
            saved
                .get(&key)
                .cloned()
                .with_context(|| format!("checkpoint has no `{key}`"))
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let value = get(format!("{prefix}.var.{name}"))?;
            anyhow::ensure!(
                value.dims() == var.as_tensor().dims(),
                "checkpoint `{prefix}.var.{name}` is {:?}, the run's is {:?}",
                value.dims(),
                var.as_tensor().dims()
            );
            var.set(&value)?;
            self.first[i] = get(format!("{prefix}.m.{name}"))?;
            self.second[i] = get(format!("{prefix}.v.{name}"))?;
        }
        self.steps = steps;
        Ok(())
    }
}

/// Where a run is: optimiser steps taken, the epoch, batches done in it, and the shuffling
/// generator's state at the epoch's start (so the epoch's batch order can be made again).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub epoch: usize,
    pub batches_done: usize,
    pub epoch_rng: u64,
}

/// Writes the run's state whole under a temporary name and renames it, so that a run killed
/// while saving keeps the previous checkpoint.
pub fn save(path: &Path, optimisers: &[(&str, &AdamW)], progress: Progress) -> Result<()> {
    let mut tensors = HashMap::new();
    for (prefix, opt) in optimisers {
        opt.tensors(prefix, &mut tensors);
    }
    let rng = progress.epoch_rng.to_le_bytes();
    let words = [
        progress.step as u32,
        progress.epoch as u32,
        progress.batches_done as u32,
        u32::from_le_bytes([rng[0], rng[1], rng[2], rng[3]]),
        u32::from_le_bytes([rng[4], rng[5], rng[6], rng[7]]),
    ];
    tensors.insert(
        "progress".to_string(),
        Tensor::new(&words[..], &Device::Cpu)?,
    );
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Restores the optimisers (variables and moments) from `path` and returns where the run was.
pub fn load(path: &Path, optimisers: &mut [(&str, &mut AdamW)]) -> Result<Progress> {
    let saved = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading checkpoint {}", path.display()))?;
    let words = saved
        .get("progress")
        .context("checkpoint has no `progress`")?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    let [step, epoch, batches_done, lo, hi] = words[..] else {
        anyhow::bail!("checkpoint `progress` has {} values, not 5", words.len());
    };
    let (lo, hi) = (lo.to_le_bytes(), hi.to_le_bytes());
    let progress = Progress {
        step: step as usize,
        epoch: epoch as usize,
        batches_done: batches_done as usize,
        epoch_rng: u64::from_le_bytes([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]),
    };
    for (prefix, opt) in optimisers.iter_mut() {
        opt.restore(prefix, &saved, progress.step)?;
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An optimiser over one variable `w` that starts at `start`.
    fn over(start: &Tensor, lr: f64, weight_decay: f64) -> Result<AdamW> {
        AdamW::new(
            vec![("w".into(), Var::from_tensor(start)?)],
            lr,
            weight_decay,
        )
    }

    /// A checkpoint path in a fresh folder of its own.
    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("themescan-{name}-{}", std::process::id()))
            .join("run.safetensors")
    }

    fn quadratic_step(opt: &mut AdamW, target: &Tensor) -> Result<()> {
        let (_, var) = &opt.vars[0];
        let loss = (var.as_tensor() - target)?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        opt.step(&grads)
    }

    /// A run saved after 3 steps and resumed into fresh variables takes the same next steps
    /// as one that never stopped: weights, moments and step count all come back.
    #[test]
    fn resumed_optimiser_continues_exactly() -> Result<()> {
        let target = Tensor::new(&[1f32, -2.0, 0.5], &Device::Cpu)?;
        let start = Tensor::new(&[0f32, 0.0, 0.0], &Device::Cpu)?;
        let mut straight = over(&start, 0.1, 0.01)?;
        let mut stopped = over(&start, 0.1, 0.01)?;
        for _ in 0..3 {
            quadratic_step(&mut straight, &target)?;
            quadratic_step(&mut stopped, &target)?;
        }
        let path = scratch("resume");
        let progress = Progress {
            step: 3,
            epoch: 1,
            batches_done: 7,
            epoch_rng: 0xDEAD_BEEF_0123_4567,
        };
        save(&path, &[("head", &stopped)], progress)?;
        let mut resumed = over(&start, 0.1, 0.01)?;
        assert_eq!(load(&path, &mut [("head", &mut resumed)])?, progress);
        for _ in 0..4 {
            quadratic_step(&mut straight, &target)?;
            quadratic_step(&mut resumed, &target)?;
        }
        let a = straight.vars[0].1.as_tensor().to_vec1::<f32>()?;
        let b = resumed.vars[0].1.as_tensor().to_vec1::<f32>()?;
        assert_eq!(a, b);
        assert!(
            (a[1] + 2.0).abs() < 1.5,
            "the steps moved towards the target: {a:?}"
        );
        std::fs::remove_dir_all(path.parent().expect("scratch has a folder"))?;
        Ok(())
    }

    #[test]
    fn a_checkpoint_of_another_shape_is_refused() -> Result<()> {
        let small = over(&Tensor::zeros(2, DType::F32, &Device::Cpu)?, 0.1, 0.0)?;
        let path = scratch("shape");
        let progress = Progress {
            step: 1,
            epoch: 0,
            batches_done: 1,
            epoch_rng: 1,
        };
        save(&path, &[("head", &small)], progress)?;
        let mut large = over(&Tensor::zeros(3, DType::F32, &Device::Cpu)?, 0.1, 0.0)?;
        let err = load(&path, &mut [("head", &mut large)]).unwrap_err();
        assert!(err.to_string().contains("head.var.w"), "{err}");
        std::fs::remove_dir_all(path.parent().expect("scratch has a folder"))?;
        Ok(())
    }
}
