//! Heads' dense layers on the host, for inference on the CPU.
//!
//! The heads are trained as candle-nn modules, but at inference they run per article on a few
//! hundred rows: candle's element-wise kernels then cost more in dispatch and thread hand-offs
//! (its own worker pool spins beside the encoder's threads) than in arithmetic. A head loaded
//! for the CPU copies its weights into these layers once and runs one `gemm` call per layer
//! on the calling thread.
//!
//! On CPUs where the encoder runs its int8 path, the wide layers can run the same int8 products
//! ([`DenseLayer::use_int8`]): with the 512-wide NER head, full analysis ran at 0.71× the
//! encoder's throughput with f32 products and 0.89× with int8 ones (`benches/analysis.rs`).

use candle_nn::Linear;

use crate::encoder::int8::gemm::{self, Kernel, PackedMatrix, QuantizedRows};
use crate::encoder::int8::ops::gelu_in_place;
use crate::error::Result;

/// `y = x Wᵀ + b` with row-major host weights `[outputs, inputs]`.
#[derive(Debug, Clone)]
pub struct DenseLayer {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    /// The weights quantised for the int8 products, when [`DenseLayer::use_int8`] chose them.
    int8: Option<(PackedMatrix, Kernel)>,
}

impl DenseLayer {
    /// Copies a candle-nn linear layer's weights to the host.
    ///
    /// # Errors
    /// A tensor error if the layer's tensors cannot be read.
    pub fn from_linear(layer: &Linear) -> Result<Self> {
        let (outputs, inputs) = layer.weight().dims2()?;
        let weight = layer.weight().flatten_all()?.to_vec1::<f32>()?;
        let bias = match layer.bias() {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; outputs],
        };
        Ok(DenseLayer {
            weight,
            bias,
            inputs,
            outputs,
            int8: None,
        })
    }

    /// Runs this layer's products in int8 with `kernel` from now on (activations quantised
    /// per row, weights per output; see [`crate::encoder::int8::gemm`]).
    pub fn use_int8(&mut self, kernel: Kernel) {
        let packed =
            PackedMatrix::quantize(&self.weight, &self.bias, self.outputs, self.inputs, kernel);
        self.int8 = Some((packed, kernel));
    }

    /// Output width.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// `x`: row-major `[rows, inputs]`; returns `[rows, outputs]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.inputs;
        assert_eq!(rows * self.inputs, x.len(), "input is not [rows, inputs]");
        if let Some((packed, kernel)) = &self.int8 {
            let mut a = QuantizedRows::default();
            a.quantize(x, self.inputs, *kernel);
            let mut y = vec![0f32; rows * self.outputs];
            gemm::matmul(&a, packed, &mut y, *kernel);
            return y;
        }
        let mut y = Vec::with_capacity(rows * self.outputs);
        for _ in 0..rows {
            y.extend_from_slice(&self.bias);
        }
        if rows == 0 {
            return y;
        }
        // SAFETY: y is [rows, outputs], x is [rows, inputs] and weight is [outputs, inputs],
        // all row-major and alive for the call; strides describe exactly those layouts.
        unsafe {
            ::gemm::gemm(
                rows,
                self.outputs,
                self.inputs,
                y.as_mut_ptr(),
                1,
                self.outputs as isize,
                true,
                x.as_ptr(),
                1,
                self.inputs as isize,
                self.weight.as_ptr(),
                self.inputs as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            );
        }
        y
    }

    /// [`DenseLayer::forward`] then exact-erf GELU.
    pub fn forward_gelu(&self, x: &[f32]) -> Vec<f32> {
        let mut y = self.forward(x);
        gelu_in_place(&mut y);
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn matches_candle_linear() {
        let w: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) / 5.0).collect();
        let b = vec![0.5f32, -1.0, 2.0];
        let layer = Linear::new(
            Tensor::from_vec(w, (3, 5), &Device::Cpu).unwrap(),
            Some(Tensor::from_vec(b, 3, &Device::Cpu).unwrap()),
        );
        let x: Vec<f32> = (0..10).map(|i| i as f32 / 3.0).collect();
        let want: Vec<f32> = layer
            .forward(&Tensor::from_vec(x.clone(), (2, 5), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = DenseLayer::from_linear(&layer).unwrap().forward(&x);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn int8_products_stay_close_to_f32() {
        let (outputs, inputs, rows) = (70, 130, 9);
        let w: Vec<f32> = (0..outputs * inputs)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
            .collect();
        let b: Vec<f32> = (0..outputs).map(|i| i as f32 / 10.0 - 3.0).collect();
        let layer = Linear::new(
            Tensor::from_vec(w, (outputs, inputs), &Device::Cpu).unwrap(),
            Some(Tensor::from_vec(b, outputs, &Device::Cpu).unwrap()),
        );
        let x: Vec<f32> = (0..rows * inputs)
            .map(|i| ((i * 53 % 97) as f32 - 30.0) / 25.0)
            .collect();
        let f32_layer = DenseLayer::from_linear(&layer).unwrap();
        let want = f32_layer.forward(&x);
        for kernel in [Kernel::Portable, Kernel::detect()] {
            let mut int8 = f32_layer.clone();
            int8.use_int8(kernel);
            let got = int8.forward(&x);
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 0.02 * scale, "{kernel:?}: {a} vs {b}");
            }
            assert_ne!(got, want, "{kernel:?} ran the f32 products");
        }
    }
}
