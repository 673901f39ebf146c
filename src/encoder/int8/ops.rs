//! Row-wise float helpers of the int8 path: layer norm, GELU, softmax, quantisation's maximum.
//!
//! Each is written once in plain Rust over 16-lane accumulators and built twice by
//! [`wide_fn!`]: for the baseline target and for AVX-512. The compiler vectorises both from the
//! same code without reordering any float operation, so the two builds agree bit for bit and the
//! portable path is an exact check on the fast one.

use super::gemm::Kernel;

/// Defines `fn name(kernel: Kernel, args..)` that runs `body` built for AVX-512 when
/// `kernel.wide()`, else built for the baseline target.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($kernel:ident: Kernel $(, $arg:ident: $ty:ty)* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($kernel: Kernel $(, $arg: $ty)*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                if $kernel.wide() {
                    // SAFETY: `Kernel::wide` is only true where `Kernel::detect` found these
                    // features on this CPU.
                    return unsafe { wide($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

const LANES: usize = 16;

/// Smallest and largest value (`(+∞, −∞)` for an empty row).
#[inline(always)]
pub fn min_max(x: &[f32]) -> (f32, f32) {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    let lo = rest.iter().chain(&lo).fold(f32::INFINITY, |m, &v| m.min(v));
    let hi = rest
        .iter()
        .chain(&hi)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    (lo, hi)
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            // Not `f32::max`: its NaN rules cost two more instructions per vector.
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    rest.iter().fold(
        lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
        |m, &v| m.max(v),
    )
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn sum_squared_deviation(x: &[f32], mean: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            lanes[i] += d * d;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()
}

/// `eˣ` to about 2 ulp for `x` in [-87, 88] (clamped outside): `2ⁿ · p(r)` with a degree-6
/// Taylor polynomial on `|r| ≤ ln 2 / 2`. Branch-free, so that loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let (r, scale) = exp_reduce(x);
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * scale
}

/// `x` (clamped to [-87, 88]) as `r` with `|r| ≤ ln 2 / 2` and `2ⁿ`, so that `eˣ = eʳ · 2ⁿ`.
#[inline(always)]
fn exp_reduce(x: f32) -> (f32, f32) {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    (r, f32::from_bits(small_integer_bits(n + 127.0) << 23))
}

/// The integer value of `v`, an integral float in `[0, 2²³)`, read off its bits: adding 2²³
/// moves it into the mantissa. Unlike `v as u32` (saturating, with a NaN check), this
/// vectorises.
#[inline(always)]
pub fn small_integer_bits(v: f32) -> u32 {
    (v + 8_388_608.0).to_bits() & 0x007f_ffff
}

/// `eˣ` to about 4e-5 relative error (degree-4 polynomial): enough where the result is rounded
/// to bfloat16 (8 bits of mantissa) right after.
#[inline(always)]
fn exp_coarse(x: f32) -> f32 {
    let (r, scale) = exp_reduce(x);
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0))));
    p * scale
}

/// GELU with the error function, `x · Φ(x)`; Φ from Abramowitz & Stegun 7.1.26 (absolute
/// error of erf below 1.5e-7).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    // erfc(z) for z ≥ 0; Φ(x) = 1 − erfc(z)/2 for x ≥ 0 and erfc(z)/2 below.
    let erfc = poly * exp(-z * z);
    let phi2 = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * phi2
}

wide_fn! {
    /// `x ← layer_norm(x + residual)` over one row, in place.
    pub fn add_layer_norm(kernel: Kernel, x: &mut [f32], residual: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
        for (x, &r) in x.iter_mut().zip(residual) {
            *x += r;
        }
        layer_norm_in_place(x, weight, bias, eps);
    }
}

wide_fn! {
    /// `x ← layer_norm(x)` over one row, in place.
    pub fn layer_norm(kernel: Kernel, x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        layer_norm_in_place(x, weight, bias, eps);
    }
}

#[inline(always)]
fn layer_norm_in_place(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let inv_std = 1.0 / (sum_squared_deviation(x, mean) / n + eps).sqrt();
    for ((x, &w), &b) in x.iter_mut().zip(weight).zip(bias) {
        *x = (*x - mean) * inv_std * w + b;
    }
}

/// Exact-erf GELU over `x`, in place, with the widest build this CPU runs.
pub(crate) fn gelu_in_place(x: &mut [f32]) {
    gelu_row(Kernel::detect(), x);
}

wide_fn! {
    /// Exact-erf GELU over one row, in place.
    pub fn gelu_row(kernel: Kernel, x: &mut [f32]) {
        for x in x.iter_mut() {
            *x = gelu(*x);
        }
    }
}

wide_fn! {
    /// Softmax over one row, in place.
    pub fn softmax_row(kernel: Kernel, x: &mut [f32]) {
        let m = max(x);
        for x in x.iter_mut() {
            *x = exp(*x - m);
        }
        let inv = 1.0 / sum(x);
        for x in x.iter_mut() {
            *x *= inv;
        }
    }
}

/// The bfloat16 nearest to `x` (ties to even), as its bits. NaN is not expected.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

wide_fn! {
    /// Softmax over `scores` written as bfloat16 into `probs[..scores.len()]`; the rest of
    /// `probs` (padding keys) is set to zero. `scores` is overwritten.
    pub fn softmax_to_bf16(kernel: Kernel, scores: &mut [f32], probs: &mut [u16]) {
        let m = max(scores);
        for x in scores.iter_mut() {
            *x = exp_coarse(*x - m);
        }
        let inv = 1.0 / sum(scores);
        let (real, padding) = probs.split_at_mut(scores.len());
        for (p, &x) in real.iter_mut().zip(scores.iter()) {
            *p = bf16_bits(x * inv);
        }
        padding.fill(0);
    }
}

wide_fn! {
    /// Converts `x` to bfloat16 bits, element by element.
    pub fn to_bf16(kernel: Kernel, x: &[f32], out: &mut [u16]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = bf16_bits(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_matches_the_erf_definition() {
        // erf from its series: accurate to 1e-12 for |z| < 5.
        fn erf(z: f64) -> f64 {
            let mut term = z;
            let mut total = z;
            for n in 1..200 {
                term *= -z * z / n as f64;
                total += term / (2 * n + 1) as f64;
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        }
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let want = 0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2));
            assert!((gelu(x) as f64 - want).abs() < 1e-6, "gelu({x})");
        }
    }

    #[test]
    fn wide_and_portable_builds_agree_bit_for_bit() {
        let wide = Kernel::detect();
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let w: Vec<f32> = (0..1000).map(|i| 1.0 + (i % 7) as f32 / 10.0).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i % 5) as f32 / 10.0).collect();
        let run = |kernel: Kernel| {
            let mut a = x.clone();
            gelu_row(kernel, &mut a);
            let mut s = x.clone();
            softmax_row(kernel, &mut s);
            let mut n = x.clone();
            add_layer_norm(kernel, &mut n, &w, &w, &b, 1e-12);
            [a, s, n].concat()
        };
        let (p, f) = (run(Kernel::Portable), run(wide));
        assert!(p.iter().zip(&f).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn softmax_sums_to_one_and_layer_norm_centres() {
        let mut x: Vec<f32> = (0..37).map(|i| i as f32 * 0.3 - 4.0).collect();
        softmax_row(Kernel::Portable, &mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let mut y: Vec<f32> = (0..37).map(|i| (i * i) as f32).collect();
        layer_norm(Kernel::Portable, &mut y, &[1.0; 37], &[0.0; 37], 1e-12);
        let mean = y.iter().sum::<f32>() / 37.0;
        let var = y.iter().map(|v| v * v).sum::<f32>() / 37.0;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4);
    }
}
