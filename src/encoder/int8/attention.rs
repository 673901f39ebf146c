//! Self-attention over packed sequences: each sequence attends only to its own tokens, so
//! there is no padding to compute or mask.
//!
//! Two precisions. Where the CPU has AVX512-BF16, queries, keys, values and probabilities are
//! rounded to bfloat16 and multiplied with `vdpbf16ps` into f32 sums, twice the work per
//! instruction of f32 FMA; scores and softmax stay f32. Elsewhere everything is f32 through
//! the `gemm` crate. The per-text embeddings of the two agree to a cosine above 0.9999.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::gemm::Kernel;
use super::ops::{softmax_row, to_bf16};
use super::DisjointOut;

/// How attention multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// bfloat16 products, f32 sums (AVX512-BF16; head widths 32 and 64).
    Bf16,
    /// f32 throughout.
    F32,
}

impl Precision {
    /// [`Precision::Bf16`] where the CPU and the head width allow it.
    pub fn detect(kernel: Kernel, head_dim: usize) -> Precision {
        #[cfg(target_arch = "x86_64")]
        {
            if kernel.wide()
                && (head_dim == 32 || head_dim == 64)
                && std::arch::is_x86_feature_detected!("avx512bf16")
            {
                return Precision::Bf16;
            }
        }
        let _ = (kernel, head_dim);
        Precision::F32
    }
}

/// One task's buffers, reused across calls on each worker thread.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: Vec<u32>,
    values: Vec<u32>,
    probs: Vec<u16>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Multi-head attention for packed sequences: sizes and the code that runs it, fixed at load.
#[derive(Debug, Clone, Copy)]
pub struct MultiHeadAttention {
    heads: usize,
    head_dim: usize,
    kernel: Kernel,
    precision: Precision,
}

impl MultiHeadAttention {
    /// Attention with `heads` heads of `head_dim`, in the best [`Precision`] the CPU allows.
    pub fn new(heads: usize, head_dim: usize, kernel: Kernel) -> Self {
        MultiHeadAttention {
            heads,
            head_dim,
            kernel,
            precision: Precision::detect(kernel, head_dim),
        }
    }

    /// The precision products run in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// `qkv`: `[tokens, 3 · hidden]`, each row `[query | key | value]` with queries already
    /// scaled by `1/√head_dim`; `sequences`: the row range of each sequence, within `tokens`;
    /// `context`: `[tokens, hidden]`, written in full; `qkv_bf16`: a buffer this call sizes.
    pub fn forward(
        &self,
        qkv: &[f32],
        sequences: &[Range<usize>],
        context: &mut [f32],
        qkv_bf16: &mut Vec<u16>,
    ) {
        let MultiHeadAttention {
            heads,
            head_dim,
            kernel,
            precision,
        } = *self;
        let hidden = heads * head_dim;
        if precision == Precision::Bf16 {
            // Converted once here, in long rows: per head and row it would be 3 calls of 32 values.
            qkv_bf16.resize(qkv.len(), 0);
            qkv_bf16
                .par_chunks_mut(3 * hidden * 16)
                .zip(qkv.par_chunks(3 * hidden * 16))
                .for_each(|(out, x)| to_bf16(kernel, x, out));
        }
        let qkv_bf16: &[u16] = qkv_bf16;
        assert_eq!(
            qkv.len(),
            3 * context.len(),
            "qkv is not [tokens, 3 · hidden]"
        );
        let out = DisjointOut::new(context);
        let tasks: Vec<(usize, usize)> = sequences
            .iter()
            .enumerate()
            .flat_map(|(s, _)| (0..heads).map(move |h| (s, h)))
            .collect();
        tasks.into_par_iter().for_each(|(s, h)| {
            let rows = sequences[s].clone();
            SCRATCH.with_borrow_mut(|scratch| {
                let head = Head {
                    rows,
                    h,
                    head_dim,
                    hidden,
                };
                // SAFETY: `rows` lies within the `tokens` rows of `qkv` and `context`; this task
                // alone writes columns `h · head_dim ..` of those rows.
                unsafe {
                    match precision {
                        #[cfg(target_arch = "x86_64")]
                        Precision::Bf16 => {
                            bf16::attend_head(qkv_bf16, &head, out.get(), scratch, kernel)
                        }
                        _ => attend_head_f32(qkv, &head, out.get(), &mut scratch.scores, kernel),
                    }
                }
            });
        });
    }
}

/// One task: a sequence's rows and a head.
struct Head {
    rows: Range<usize>,
    h: usize,
    head_dim: usize,
    hidden: usize,
}

/// # Safety
/// `head.rows` must be within `qkv`'s rows; `context` must point to `[tokens, hidden]` floats
/// whose block (`rows`, head `h`) nobody else touches during the call.
unsafe fn attend_head_f32(
    qkv: &[f32],
    head: &Head,
    context: *mut f32,
    scores: &mut Vec<f32>,
    kernel: Kernel,
) {
    let Head {
        rows,
        h,
        head_dim,
        hidden,
    } = head;
    let (h, head_dim, hidden) = (*h, *head_dim, *hidden);
    let len = rows.len();
    let stride = 3 * hidden;
    scores.resize(len * len, 0.0);
    let base = qkv[rows.start * stride..].as_ptr();
    let query = base.add(h * head_dim);
    let key = base.add(hidden + h * head_dim);
    let value = base.add(2 * hidden + h * head_dim);
    let s = stride as isize;
    // scores[i, j] = query_i · key_j
    gemm::gemm(
        len,
        len,
        head_dim,
        scores.as_mut_ptr(),
        1,
        len as isize,
        false,
        query,
        1,
        s,
        key,
        s,
        1,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
    for row in scores.chunks_exact_mut(len) {
        softmax_row(kernel, row);
    }
    // context[i, head] = Σ_j scores[i, j] · value_j
    gemm::gemm(
        len,
        head_dim,
        len,
        context.add(rows.start * hidden + h * head_dim),
        1,
        hidden as isize,
        false,
        scores.as_ptr(),
        1,
        len as isize,
        value,
        1,
        s,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

#[cfg(target_arch = "x86_64")]
mod bf16 {
    use std::arch::x86_64::*;

    use super::{Head, Scratch};
    use crate::encoder::int8::gemm::Kernel;
    use crate::encoder::int8::ops::softmax_to_bf16;

    /// Query rows per score tile, key blocks (of 16) per score tile, and rows per output tile
    /// for head widths 32 (2 blocks) and 64 (4 blocks): 24 accumulators each.
    const QK_ROWS: usize = 6;
    const QK_BLOCKS: usize = 4;

    /// # Safety
    /// As `attend_head_f32`, and the CPU must have AVX-512 F and BF16; `head_dim` is 32 or 64.
    pub unsafe fn attend_head(
        qkv: &[u16],
        head: &Head,
        context: *mut f32,
        s: &mut Scratch,
        kernel: Kernel,
    ) {
        let (d, hidden) = (head.head_dim, head.hidden);
        let len = head.rows.len();
        // Keys padded to whole blocks of 16; padded keys get probability 0.
        let padded = len.div_ceil(16) * 16;
        let stride = 3 * hidden;
        let base = &qkv[head.rows.start * stride..head.rows.end * stride];
        let (q0, k0, v0) = (head.h * d, hidden + head.h * d, 2 * hidden + head.h * d);

        // Queries are read in place: a 32-bit load of a row broadcasts a pair of dims.
        // Keys: [block of 16][pair of dims][16 keys], each entry a pair of bfloat16 in a u32,
        // so one 64-byte vector per (block, pair).
        let pairs = d / 2;
        s.keys.clear();
        s.keys.resize(padded * pairs, 0);
        for (block, rows) in base.chunks(16 * stride).enumerate() {
            let dst = &mut s.keys[block * pairs * 16..(block + 1) * pairs * 16];
            for (lane, row) in rows.chunks_exact(stride).enumerate() {
                for (pair, key) in row[k0..k0 + d].chunks_exact(2).enumerate() {
                    dst[pair * 16 + lane] = key[0] as u32 | (key[1] as u32) << 16;
                }
            }
        }
        // Values: [pair of keys][dim], each entry the two keys' bfloat16 values in a u32.
        s.values.clear();
        s.values.resize(padded / 2 * d, 0);
        for (two, dst) in base.chunks(2 * stride).zip(s.values.chunks_exact_mut(d)) {
            let first = &two[v0..v0 + d];
            match two.get(stride + v0..stride + v0 + d) {
                Some(second) => {
                    for ((o, &a), &b) in dst.iter_mut().zip(first).zip(second) {
                        *o = a as u32 | (b as u32) << 16;
                    }
                }
                None => {
                    for (o, &a) in dst.iter_mut().zip(first) {
                        *o = a as u32;
                    }
                }
            }
        }
        let blocks = d / 16;

        s.scores.resize(len * padded, 0.0);
        let key_blocks = padded / 16;
        let mut i = 0;
        while i < len {
            let rows = QK_ROWS.min(len - i);
            let mut b = 0;
            while b < key_blocks {
                let nb = QK_BLOCKS.min(key_blocks - b);
                scores_tile(
                    s,
                    base[i * stride + q0..].as_ptr(),
                    stride,
                    rows,
                    i,
                    b,
                    nb,
                    d,
                    padded,
                );
                b += nb;
            }
            i += rows;
        }
        s.probs.resize(len * padded, 0);
        for (scores, probs) in s
            .scores
            .chunks_exact_mut(padded)
            .zip(s.probs.chunks_exact_mut(padded))
        {
            softmax_to_bf16(kernel, &mut scores[..len], probs);
        }

        let out = context.add(head.rows.start * hidden + head.h * d);
        let step = if blocks == 2 { 12 } else { 6 };
        let mut i = 0;
        while i < len {
            let rows = step.min(len - i);
            output_tile(s, i, rows, blocks, padded, out.add(i * hidden), hidden);
            i += rows;
        }
    }

    /// Scores of query rows `i..i + rows` (bfloat16 at `q`, `q_stride` apart) against key
    /// blocks `b..b + nb`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn scores_tile(
        s: &mut Scratch,
        q: *const u16,
        q_stride: usize,
        rows: usize,
        i: usize,
        b: usize,
        nb: usize,
        d: usize,
        padded: usize,
    ) {
        macro_rules! dispatch {
            ($($r:literal),*) => {
                match (rows, nb) {
                    $( ($r, 4) => scores_rows::<$r, 4>(s, q, q_stride, i, b, d, padded),
                       ($r, 3) => scores_rows::<$r, 3>(s, q, q_stride, i, b, d, padded),
                       ($r, 2) => scores_rows::<$r, 2>(s, q, q_stride, i, b, d, padded),
                       ($r, _) => scores_rows::<$r, 1>(s, q, q_stride, i, b, d, padded), )*
                    _ => unreachable!("tiles have 1 to {QK_ROWS} rows"),
                }
            };
        }
        dispatch!(1, 2, 3, 4, 5, 6)
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn scores_rows<const R: usize, const B: usize>(
        s: &mut Scratch,
        q: *const u16,
        q_stride: usize,
        i: usize,
        b: usize,
        d: usize,
        padded: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let pairs = d / 2;
        let k = (s.keys.as_ptr() as *const u16).add(b * pairs * 32);
        for pair in 0..pairs {
            let keys: [__m512bh; B] = std::array::from_fn(|x| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    k.add((x * pairs + pair) * 32) as *const _,
                ))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let q = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    (q.add(r * q_stride + 2 * pair) as *const i32).read_unaligned(),
                ));
                for (acc, &keys) in acc.iter_mut().zip(&keys) {
                    *acc = _mm512_dpbf16_ps(*acc, q, keys);
                }
            }
        }
        let out = s.scores.as_mut_ptr().add(i * padded + b * 16);
        for (r, acc) in acc.iter().enumerate() {
            for (x, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(r * padded + x * 16), acc);
            }
        }
    }

    /// Context rows `i..i + rows` of this head: probabilities × values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn output_tile(
        s: &Scratch,
        i: usize,
        rows: usize,
        blocks: usize,
        padded: usize,
        out: *mut f32,
        hidden: usize,
    ) {
        macro_rules! dispatch {
            ($b:literal; $($r:literal),*) => {
                match rows {
                    $( $r => output_rows::<$r, $b>(s, i, padded, out, hidden), )*
                    _ => unreachable!("tiles have 1 to 12 rows"),
                }
            };
        }
        if blocks == 2 {
            dispatch!(2; 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
        } else {
            dispatch!(4; 1, 2, 3, 4, 5, 6)
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn output_rows<const R: usize, const B: usize>(
        s: &Scratch,
        i: usize,
        padded: usize,
        out: *mut f32,
        hidden: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let p = s.probs.as_ptr().add(i * padded) as *const i32;
        let v = s.values.as_ptr() as *const u16;
        for pair in 0..padded / 2 {
            let values: [__m512bh; B] = std::array::from_fn(|x| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    v.add((pair * B + x) * 32) as *const _,
                ))
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    p.add(r * padded / 2 + pair).read_unaligned(),
                ));
                for (acc, &values) in acc.iter_mut().zip(&values) {
                    *acc = _mm512_dpbf16_ps(*acc, p, values);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (x, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add(r * hidden + x * 16), acc);
            }
        }
    }
}
