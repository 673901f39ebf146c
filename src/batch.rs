//! Batches: sequences of token ids padded to one length, and packing many sequences into
//! batches under a token budget.
//!
//! A [`Batch`] is plain host data (ids, lengths); it never holds a tensor. The encoder turns it
//! into tensors in one place.

/// Token sequences padded to a common length, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    ids: Vec<u32>,
    lengths: Vec<usize>,
    max_len: usize,
}

impl Batch {
    /// Pads `sequences` with `pad_id` to the longest one.
    pub fn new<S: AsRef<[u32]>>(sequences: &[S], pad_id: u32) -> Self {
        let max_len = sequences
            .iter()
            .map(|s| s.as_ref().len())
            .max()
            .unwrap_or(0);
        let mut ids = Vec::with_capacity(sequences.len() * max_len);
        let mut lengths = Vec::with_capacity(sequences.len());
        for s in sequences {
            let s = s.as_ref();
            ids.extend_from_slice(s);
            ids.resize(ids.len() + max_len - s.len(), pad_id);
            lengths.push(s.len());
        }
        Batch {
            ids,
            lengths,
            max_len,
        }
    }

    /// Row-major `[rows, max_len]` ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Number of sequences.
    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// Length of the longest sequence; every row is padded to it.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Real length of each row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Row-major `[rows, max_len]` mask: 1.0 for real tokens, 0.0 for padding.
    pub fn mask(&self) -> Vec<f32> {
        let mut mask = vec![0f32; self.ids.len()];
        for (row, &len) in mask
            .chunks_exact_mut(self.max_len.max(1))
            .zip(&self.lengths)
        {
            row[..len].fill(1.0);
        }
        mask
    }
}

/// Groups sequences into batches: longest first, so that each batch holds sequences of similar
/// length, and no batch's padded size (`rows × longest`) exceeds `token_budget` unless a single
/// sequence alone does. Returns indices into `lengths`; every index appears exactly once.
pub fn plan_batches(lengths: &[usize], token_budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted longest first, so the first row of a batch sets its padded length.
        let longest = current.first().map_or(lengths[i], |&first| lengths[first]);
        if !current.is_empty() && (current.len() + 1) * longest > token_budget {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_longest_and_masks_padding() {
        let b = Batch::new(&[vec![5, 6, 7], vec![8]], 1);
        assert_eq!(b.ids(), &[5, 6, 7, 8, 1, 1]);
        assert_eq!(b.mask(), vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!((b.rows(), b.max_len()), (2, 3));
    }

    #[test]
    fn plans_every_sequence_once_within_budget() {
        let lengths = [10, 500, 30, 30, 200, 512, 3];
        let plan = plan_batches(&lengths, 1024);
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for batch in &plan {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() * longest <= 1024, "batch {batch:?} over budget");
        }
    }

    #[test]
    fn oversized_sequence_gets_its_own_batch() {
        let plan = plan_batches(&[600, 600, 10], 512);
        assert_eq!(plan.len(), 3);
    }
}
