//! Splitting a long token sequence into overlapping windows that cover every token.

use std::ops::Range;

/// Ranges of at most `capacity` tokens over `0..len`, consecutive windows sharing `overlap`
/// tokens (more for the last one, which is aligned to the end so that it is full). Together
/// they cover every index; an empty sequence gives one empty window.
///
/// `overlap` must be below `capacity`; the caller validates this.
pub fn plan_windows(len: usize, capacity: usize, overlap: usize) -> Vec<Range<usize>> {
    debug_assert!(
        capacity > 0 && overlap < capacity,
        "validated by WindowConfig"
    );
    if len <= capacity {
        #[allow(clippy::single_range_in_vec_init)] // one window covering 0..len
        return vec![0..len];
    }
    let stride = capacity - overlap;
    let mut windows = Vec::new();
    let mut start = 0;
    while start + capacity < len {
        windows.push(start..start + capacity);
        start += stride;
    }
    windows.push(len - capacity..len);
    windows
}

/// For each token of `0..len`, the window whose centre it is closest to: with overlap, every
/// token is seen by one or more windows, and the one where it has most context on both sides
/// "owns" it. Returns the owning window's index per token.
pub fn owning_window(windows: &[Range<usize>], len: usize) -> Vec<usize> {
    (0..len)
        .map(|t| {
            windows
                .iter()
                .enumerate()
                .filter(|(_, range)| range.contains(&t))
                // Distance to the nearest edge of the window; the largest wins, the first on ties.
                .max_by_key(|&(w, range)| {
                    (
                        (t - range.start).min(range.end - 1 - t),
                        std::cmp::Reverse(w),
                    )
                })
                .map_or(0, |(w, _)| w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sequence_is_one_window() {
        assert_eq!(plan_windows(10, 510, 64), vec![0..10]);
        assert_eq!(plan_windows(0, 510, 64), vec![0..0]);
    }

    #[test]
    fn long_sequence_is_covered_with_overlap() {
        for (len, cap, overlap) in [(1000, 100, 20), (101, 100, 0), (5000, 507, 64), (300, 7, 6)] {
            let windows = plan_windows(len, cap, overlap);
            let mut covered = vec![false; len];
            for w in &windows {
                assert!(w.len() <= cap);
                covered[w.clone()].iter_mut().for_each(|c| *c = true);
            }
            assert!(
                covered.iter().all(|&c| c),
                "{len} {cap} {overlap}: {windows:?}"
            );
            for pair in windows.windows(2) {
                assert!(
                    pair[1].start <= pair[0].end - overlap,
                    "overlap too small: {pair:?}"
                );
            }
            assert_eq!(windows.last().unwrap().end, len);
        }
    }

    #[test]
    fn each_token_owned_by_a_window_containing_it() {
        let windows = plan_windows(1000, 100, 30);
        let owner = owning_window(&windows, 1000);
        for (t, &w) in owner.iter().enumerate() {
            assert!(windows[w].contains(&t));
        }
        // Token 75 is 25 from the end of window 0 and 5 from the start of window 1.
        assert_eq!(owner[75], 0);
        assert_eq!(owner[95], 1);
    }
}
