//! Int8 matrix products: activations quantised per row to unsigned bytes, weights quantised per
//! output column to signed bytes and repacked once at load, products summed exactly in `i32`.
//!
//! `out[m, n] = a_scale[m] · w_scale[n] · Σ_k (a_q[m, k] − a_zero[m]) · w_q[n, k] + bias[n]`
//!
//! Activations are quantised asymmetrically, over each row's own `[min, max]`, with a zero point
//! per row: the AVX-512 VNNI instruction (`vpdpbusd`) multiplies unsigned by signed bytes
//! anyway, and layer-norm outputs and GELU outputs are skewed, so a symmetric range would waste
//! up to half the levels (measured: min cosine to f32 0.9991 symmetric, 0.9997 asymmetric). The
//! `a_zero[m] · Σ_k w_q[n, k]` term is subtracted per output from column sums kept at load.
//!
//! Two kernels compute the same integer sums: one with VNNI, one in plain Rust for every other
//! CPU and for tests. Their outputs are bit-identical: integer sums are exact and the float
//! epilogue is shared code.

use rayon::prelude::*;

use super::ops::{min_max, small_integer_bits, wide_fn};
use super::DisjointOut;

/// Output columns per panel: four 16-lane `i32` registers.
pub const PANEL: usize = 64;
/// Rows per micro-tile: 6 rows × 4 registers = 24 accumulators, within the 32 AVX-512 registers.
pub const TILE_ROWS: usize = 6;
/// Rows per parallel task: a multiple of [`TILE_ROWS`], large enough to amortise scheduling.
const TASK_ROWS: usize = 96;

/// Which code computes the integer sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 VNNI (`vpdpbusd`), for x86-64 CPUs that have it.
    Vnni,
    /// Plain Rust: any CPU; the reference the VNNI kernel is tested against.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs: [`Kernel::Vnni`] where AVX-512 F, BW and VNNI are
    /// present, else [`Kernel::Portable`].
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Vnni;
            }
        }
        Kernel::Portable
    }

    /// Whether the wide (AVX-512) builds of the element-wise helpers may run.
    pub fn wide(self) -> bool {
        self == Kernel::Vnni
    }
}

/// A weight matrix `[n, k]` (PyTorch's `Linear` layout) quantised to `i8` per output row and
/// laid out for one [`Kernel`], in panels of [`PANEL`] outputs.
///
/// For [`Kernel::Vnni`], a panel is, for each group of 4 inputs, 4 × 16 outputs × 4 bytes, so
/// that one 64-byte load gives `vpdpbusd` 16 outputs' next 4 weights. For
/// [`Kernel::Portable`], a panel is its 64 rows as they are, so that each output is one
/// contiguous dot product, which compilers vectorise.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    k_padded: usize,
    layout: Kernel,
    panels: Vec<i8>,
    scales: Vec<f32>,
    /// `Σ_k w_q[n, k]` per output.
    sums: Vec<i32>,
    bias: Vec<f32>,
}

impl PackedMatrix {
    /// Quantises `weight` (row-major `[n, k]`) for `kernel` and keeps `bias` (`[n]`).
    ///
    /// # Panics
    /// If the slices do not have `n · k` and `n` elements: callers pass checkpoint tensors whose
    /// shapes were checked at load.
    pub fn quantize(weight: &[f32], bias: &[f32], n: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(weight.len(), n * k, "weight is not [n, k]");
        assert_eq!(bias.len(), n, "bias is not [n]");
        let k_padded = k.div_ceil(4) * 4;
        let n_padded = n.div_ceil(PANEL) * PANEL;
        let mut scales = vec![0f32; n_padded];
        let mut sums = vec![0i32; n_padded];
        let mut bias_padded = vec![0f32; n_padded];
        bias_padded[..n].copy_from_slice(bias);
        let mut rows = vec![0i8; n_padded * k_padded];
        for (j, row) in weight.chunks_exact(k).enumerate() {
            let max = row.iter().fold(0f32, |m, &w| m.max(w.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            let inv = 1.0 / scale;
            let q = &mut rows[j * k_padded..j * k_padded + k];
            for (q, &w) in q.iter_mut().zip(row) {
                *q = (w * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
            scales[j] = scale;
            sums[j] = q.iter().map(|&v| v as i32).sum::<i32>();
        }
        if kernel == Kernel::Portable {
            return PackedMatrix {
                n,
                k,
                k_padded,
                layout: kernel,
                panels: rows,
                scales,
                sums,
                bias: bias_padded,
            };
        }
        let mut panels = vec![0i8; n_padded * k_padded];
        let panel_bytes = PANEL * k_padded;
        for (p, panel) in panels.chunks_exact_mut(panel_bytes).enumerate() {
            for g in 0..k_padded / 4 {
                for col in 0..PANEL {
                    let j = p * PANEL + col;
                    let src = &rows[j * k_padded + g * 4..j * k_padded + g * 4 + 4];
                    let dst = g * PANEL * 4 + col * 4;
                    panel[dst..dst + 4].copy_from_slice(src);
                }
            }
        }
        PackedMatrix {
            n,
            k,
            k_padded,
            layout: kernel,
            panels,
            scales,
            sums,
            bias: bias_padded,
        }
    }
}

/// How one row of activations was quantised: `x ≈ scale · (q − zero)`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowScale {
    /// Step between levels.
    pub scale: f32,
    /// The level that stands for 0.
    pub zero: i32,
}

/// Rows of activations quantised to `u8`, with a scale and a zero point per row.
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    data: Vec<u8>,
    scales: Vec<RowScale>,
    cols: usize,
    stride: usize,
}

impl QuantizedRows {
    /// Quantises row-major `x` (`[rows, cols]`), reusing this buffer's memory.
    pub fn quantize(&mut self, x: &[f32], cols: usize, kernel: Kernel) {
        let rows = x.len() / cols;
        self.prepare(rows, cols);
        let stride = self.stride;
        self.data
            .par_chunks_mut(stride * 16)
            .zip(self.scales.par_chunks_mut(16))
            .zip(x.par_chunks(cols * 16))
            .for_each(|((q, s), x)| {
                for ((q, s), x) in q.chunks_mut(stride).zip(s).zip(x.chunks(cols)) {
                    *s = quantize_row(kernel, x, q);
                }
            });
    }

    /// Sizes the buffer for `rows × cols` and leaves the rows to be written by
    /// [`QuantizedRows::rows_mut`].
    pub fn prepare(&mut self, rows: usize, cols: usize) {
        let stride = cols.div_ceil(4) * 4;
        self.cols = cols;
        self.stride = stride;
        // Padding columns meet zero weights, so their value never matters.
        self.data.clear();
        self.data.resize(rows * stride, 0);
        self.scales.clear();
        self.scales.resize(rows, RowScale::default());
    }

    /// Mutable rows and scales, in chunks of `rows_per_chunk` rows, for callers that quantise
    /// as they produce a row (see [`quantize_row`]).
    pub fn rows_mut(
        &mut self,
        rows_per_chunk: usize,
    ) -> impl IndexedParallelIterator<Item = (&mut [u8], &mut [RowScale])> {
        let stride = self.stride;
        self.data
            .par_chunks_mut(stride * rows_per_chunk)
            .zip(self.scales.par_chunks_mut(rows_per_chunk))
    }

    /// Bytes per stored row (columns rounded up to a multiple of 4).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.scales.len()
    }
}

wide_fn! {
    /// Quantises one row into `q` (at least `x.len()` bytes) over its `[min(x, 0), max(x, 0)]`.
    pub fn quantize_row(kernel: Kernel, x: &[f32], q: &mut [u8]) -> RowScale {
        let (min, max) = min_max(x);
        let (min, max) = (min.min(0.0), max.max(0.0));
        let scale = if max > min { (max - min) / 255.0 } else { 1.0 };
        let inv = 1.0 / scale;
        let zero = (-min * inv).round_ties_even().clamp(0.0, 255.0);
        for (q, &v) in q.iter_mut().zip(x) {
            // Adding 2²³ rounds to the nearest level (ties to even) as it moves it into the
            // mantissa's low byte.
            *q = small_integer_bits((v * inv + zero).clamp(0.0, 255.0)) as u8;
        }
        RowScale {
            scale,
            zero: zero as i32,
        }
    }
}

/// `out = a · wᵀ` (+ bias), with `out` row-major `[a.rows(), outputs]`.
///
/// # Panics
/// If `a`'s width is not `w`'s input width or `out` has the wrong length (internal misuse).
pub fn matmul(a: &QuantizedRows, w: &PackedMatrix, out: &mut [f32], kernel: Kernel) {
    assert_eq!(
        a.cols, w.k,
        "activation width is not the weight's input width"
    );
    assert_eq!(a.stride, w.k_padded);
    assert_eq!(w.layout, kernel, "weights packed for another kernel");
    let m = a.rows();
    assert_eq!(out.len(), m * w.n, "output is not [rows, outputs]");
    let panels = w.n.div_ceil(PANEL);
    let row_blocks = m.div_ceil(TASK_ROWS);
    let ptr = DisjointOut::new(out);
    (0..row_blocks * panels).into_par_iter().for_each(|task| {
        let (block, panel) = (task / panels, task % panels);
        let rows = block * TASK_ROWS..((block + 1) * TASK_ROWS).min(m);
        // SAFETY: this task alone writes rows `rows` × columns of panel `panel`; the pointer
        // covers `m · n` floats and stays alive while `matmul` runs.
        unsafe { panel_block(a, w, rows, panel, ptr.get(), kernel) };
    });
}

/// Computes rows `rows` × the columns of `panel`, a tile of up to [`TILE_ROWS`] rows at a time.
///
/// # Safety
/// `out` must point to a row-major `[a.rows(), w.n]` buffer that no one else writes in this
/// block.
unsafe fn panel_block(
    a: &QuantizedRows,
    w: &PackedMatrix,
    rows: std::ops::Range<usize>,
    panel: usize,
    out: *mut f32,
    kernel: Kernel,
) {
    let groups = w.k_padded / 4;
    let weights = &w.panels[panel * PANEL * w.k_padded..(panel + 1) * PANEL * w.k_padded];
    let col0 = panel * PANEL;
    let cols = PANEL.min(w.n - col0);
    let mut acc = [[0i32; PANEL]; TILE_ROWS];
    let mut r = rows.start;
    while r < rows.end {
        let tile = TILE_ROWS.min(rows.end - r);
        let a_rows = &a.data[r * a.stride..(r + tile) * a.stride];
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Vnni {
            let epilogue = vnni::Epilogue {
                rows: &a.scales[r..r + tile],
                w_scales: &w.scales[col0..col0 + PANEL],
                w_sums: &w.sums[col0..col0 + PANEL],
                bias: &w.bias[col0..col0 + PANEL],
                cols,
            };
            // SAFETY: `Kernel::Vnni` is only chosen when the CPU has the features; the tile's
            // rows × `cols` columns at `out` are this block's.
            unsafe {
                vnni::tile(
                    a_rows,
                    a.stride,
                    weights,
                    groups,
                    &epilogue,
                    out.add(r * w.n + col0),
                    w.n,
                )
            };
            r += tile;
            continue;
        }
        portable_tile(a_rows, a.stride, weights, &mut acc);
        for (t, acc) in acc.iter().enumerate().take(tile) {
            let row = r + t;
            let row_scale = a.scales[row];
            // SAFETY: row < m and col0 + cols <= n, inside the caller's buffer.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.add(row * w.n + col0), cols) };
            epilogue(
                kernel,
                dst,
                &acc[..cols],
                row_scale,
                &w.scales[col0..col0 + cols],
                &w.sums[col0..col0 + cols],
                &w.bias[col0..col0 + cols],
            );
        }
        r += tile;
    }
}

wide_fn! {
    /// `dst = (acc − a_zero · w_sum) · a_scale · w_scale + bias` for one row of a tile.
    fn epilogue(
        kernel: Kernel,
        dst: &mut [f32],
        acc: &[i32],
        a: RowScale,
        w_scales: &[f32],
        w_sums: &[i32],
        bias: &[f32],
    ) {
        for ((((d, &s), &ws), &sum), &b) in
            dst.iter_mut().zip(acc).zip(w_scales).zip(w_sums).zip(bias)
        {
            *d = (s - a.zero * sum) as f32 * (a.scale * ws) + b;
        }
    }
}

/// The integer sums of up to [`TILE_ROWS`] rows × one panel, in plain Rust: one contiguous
/// dot product per output, over the panel's rows.
fn portable_tile(a: &[u8], stride: usize, panel: &[i8], acc: &mut [[i32; PANEL]; TILE_ROWS]) {
    let tile = a.len() / stride;
    for (t, acc) in acc.iter_mut().enumerate().take(tile) {
        let x = &a[t * stride..(t + 1) * stride];
        for (acc, w) in acc.iter_mut().zip(panel.chunks_exact(stride)) {
            *acc = x.iter().zip(w).map(|(&x, &w)| x as i32 * w as i32).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{RowScale, PANEL};
    use std::arch::x86_64::*;

    /// What turns a tile's integer sums into outputs; the same arithmetic as `epilogue`, so
    /// that both kernels give the same bits.
    pub struct Epilogue<'a> {
        /// One per tile row.
        pub rows: &'a [RowScale],
        /// The panel's [`PANEL`] columns (padded past `cols`).
        pub w_scales: &'a [f32],
        pub w_sums: &'a [i32],
        pub bias: &'a [f32],
        /// Columns to write (fewer than [`PANEL`] at the right edge of the matrix).
        pub cols: usize,
    }

    /// Up to 6 rows × one panel with `vpdpbusd`, written to `out` (row `r` at `out + r · ldo`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `out` must be writable for the tile's rows ×
    /// `cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile(
        a: &[u8],
        stride: usize,
        panel: &[i8],
        groups: usize,
        epilogue: &Epilogue<'_>,
        out: *mut f32,
        ldo: usize,
    ) {
        match a.len() / stride {
            6 => rows::<6>(a, stride, panel, groups, epilogue, out, ldo),
            5 => rows::<5>(a, stride, panel, groups, epilogue, out, ldo),
            4 => rows::<4>(a, stride, panel, groups, epilogue, out, ldo),
            3 => rows::<3>(a, stride, panel, groups, epilogue, out, ldo),
            2 => rows::<2>(a, stride, panel, groups, epilogue, out, ldo),
            _ => rows::<1>(a, stride, panel, groups, epilogue, out, ldo),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn rows<const R: usize>(
        a: &[u8],
        stride: usize,
        panel: &[i8],
        groups: usize,
        epilogue: &Epilogue<'_>,
        out: *mut f32,
        ldo: usize,
    ) {
        debug_assert!(a.len() >= R * stride && panel.len() >= groups * PANEL * 4);
        debug_assert!(epilogue.rows.len() >= R && epilogue.w_scales.len() >= PANEL);
        let mut sums = [[_mm512_setzero_si512(); 4]; R];
        let a = a.as_ptr();
        let mut w = panel.as_ptr();
        for g in 0..groups {
            // SAFETY: `panel` holds `groups` groups of 256 bytes; each row of `a` holds
            // `groups · 4` bytes (stride ≥ that).
            let w0 = _mm512_loadu_si512(w as *const _);
            let w1 = _mm512_loadu_si512(w.add(64) as *const _);
            let w2 = _mm512_loadu_si512(w.add(128) as *const _);
            let w3 = _mm512_loadu_si512(w.add(192) as *const _);
            for (r, sums) in sums.iter_mut().enumerate() {
                let x =
                    _mm512_set1_epi32((a.add(r * stride + g * 4) as *const i32).read_unaligned());
                sums[0] = _mm512_dpbusd_epi32(sums[0], x, w0);
                sums[1] = _mm512_dpbusd_epi32(sums[1], x, w1);
                sums[2] = _mm512_dpbusd_epi32(sums[2], x, w2);
                sums[3] = _mm512_dpbusd_epi32(sums[3], x, w3);
            }
            w = w.add(PANEL * 4);
        }
        for z in 0..4 {
            let valid = epilogue.cols.saturating_sub(z * 16).min(16);
            if valid == 0 {
                break;
            }
            let mask: __mmask16 = if valid == 16 { !0 } else { (1u16 << valid) - 1 };
            let w_scale = _mm512_loadu_ps(epilogue.w_scales.as_ptr().add(z * 16));
            let w_sum = _mm512_loadu_si512(epilogue.w_sums.as_ptr().add(z * 16) as *const _);
            let bias = _mm512_loadu_ps(epilogue.bias.as_ptr().add(z * 16));
            for (r, sums) in sums.iter().enumerate() {
                let row = epilogue.rows[r];
                let centred = _mm512_sub_epi32(
                    sums[z],
                    _mm512_mullo_epi32(_mm512_set1_epi32(row.zero), w_sum),
                );
                let scale = _mm512_mul_ps(_mm512_set1_ps(row.scale), w_scale);
                let y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(centred), scale), bias);
                _mm512_mask_storeu_ps(out.add(r * ldo + z * 16), mask, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn product(m: usize, n: usize, k: usize, kernel: Kernel) -> (Vec<f32>, Vec<f32>) {
        let mut seed = (m * 1000 + n * 10 + k) as u64;
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.2).collect();
        let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let packed = PackedMatrix::quantize(&w, &b, n, k, kernel);
        let mut q = QuantizedRows::default();
        q.quantize(&x, k, kernel);
        let mut out = vec![0f32; m * n];
        matmul(&q, &packed, &mut out, kernel);
        let exact: Vec<f32> = (0..m)
            .flat_map(|i| {
                let (x, w, b) = (&x, &w, &b);
                (0..n).map(move |j| (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum::<f32>() + b[j])
            })
            .collect();
        (out, exact)
    }

    #[test]
    fn int8_product_is_close_to_the_f32_product() {
        for (m, n, k) in [(1, 64, 4), (7, 70, 33), (13, 128, 384), (100, 200, 96)] {
            let (out, exact) = product(m, n, k, Kernel::Portable);
            let norm = exact.iter().map(|v| v * v).sum::<f32>().sqrt();
            let err = out
                .iter()
                .zip(&exact)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert!(
                err / norm < 0.01,
                "{m}x{n}x{k}: relative error {}",
                err / norm
            );
        }
    }

    #[test]
    fn vnni_kernel_matches_the_portable_kernel_bit_for_bit() {
        if Kernel::detect() != Kernel::Vnni {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        for (m, n, k) in [
            (1, 64, 4),
            (5, 70, 33),
            (13, 128, 384),
            (200, 1152, 384),
            (97, 384, 1536),
        ] {
            let (fast, _) = product(m, n, k, Kernel::Vnni);
            let (portable, _) = product(m, n, k, Kernel::Portable);
            assert!(
                fast.iter()
                    .zip(&portable)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{m}x{n}x{k}"
            );
        }
    }

    #[test]
    fn zero_rows_and_weights_give_the_bias() {
        let packed = PackedMatrix::quantize(&[0.0; 8], &[1.5, -2.0], 2, 4, Kernel::detect());
        let mut q = QuantizedRows::default();
        q.quantize(&[0.0; 4], 4, Kernel::Portable);
        let mut out = vec![0f32; 2];
        matmul(&q, &packed, &mut out, Kernel::detect());
        assert_eq!(out, vec![1.5, -2.0]);
    }
}
