//! Self-attention over packed sequences: each sequence attends only to its own tokens, so
//! there is no padding to compute or mask.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::gemm::Kernel;
use super::ops::softmax_row;

thread_local! {
    /// One sequence × head's score matrix, reused across calls on each worker thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A raw pointer to the context output that tasks share; each writes its own head's columns.
#[derive(Clone, Copy)]
struct ContextPtr(*mut f32);
// SAFETY: tasks write disjoint (rows of one sequence) × (columns of one head) blocks.
unsafe impl Send for ContextPtr {}
unsafe impl Sync for ContextPtr {}

impl ContextPtr {
    /// A method, so that closures capture the wrapper (which is `Send`), not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Multi-head attention for packed sequences.
///
/// `qkv`: `[tokens, 3 · hidden]`, each row `[query | key | value]` with queries already scaled
/// by `1/√head_dim`; `sequences`: the row range of each sequence; `context`: `[tokens, hidden]`,
/// written in full.
pub fn attend(
    qkv: &[f32],
    sequences: &[Range<usize>],
    heads: usize,
    head_dim: usize,
    context: &mut [f32],
    kernel: Kernel,
) {
    let hidden = heads * head_dim;
    assert_eq!(
        qkv.len(),
        3 * context.len(),
        "qkv is not [tokens, 3 · hidden]"
    );
    let out = ContextPtr(context.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = sequences
        .iter()
        .enumerate()
        .flat_map(|(s, _)| (0..heads).map(move |h| (s, h)))
        .collect();
    tasks.into_par_iter().for_each(|(s, h)| {
        let rows = sequences[s].clone();
        SCORES.with_borrow_mut(|scores| {
            // SAFETY: `rows` lies within the `tokens` rows of `qkv` and `context`; this task
            // alone writes columns `h · head_dim ..` of those rows.
            unsafe { attend_head(qkv, rows, h, head_dim, hidden, out.get(), scores, kernel) }
        });
    });
}

/// # Safety
/// `rows` must be within `qkv`'s rows; `context` must point to `[tokens, hidden]` floats whose
/// block (`rows`, head `h`) nobody else touches during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_head(
    qkv: &[f32],
    rows: Range<usize>,
    h: usize,
    head_dim: usize,
    hidden: usize,
    context: *mut f32,
    scores: &mut Vec<f32>,
    kernel: Kernel,
) {
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
