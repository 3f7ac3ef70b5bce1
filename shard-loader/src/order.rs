//! The global sample order: which tokens global sample `i` is, for every `i`, as a pure
//! function of the dataset's block sizes, the sequence length and the seed.
//!
//! A *block* is one Parquet row group. For epoch `e`:
//!
//! 1. the blocks are visited in a permutation seeded by `(seed, e)`, their documents
//!    concatenated into one token stream of `T` tokens (every epoch has the same `T`);
//! 2. the stream is cut into `n = (T - 1) / seq_len` sequences; sequence `j` is tokens
//!    `j * seq_len ..= (j + 1) * seq_len` (input plus the shifted target);
//! 3. positions `0..n` are grouped in windows of `shuffle_window` consecutive sequences, and
//!    each window is shuffled by a permutation seeded by `(seed, e, window)`.
//!
//! Global sample `i` is position `i % n` of epoch `i / n`. Nothing depends on how many
//! ranks read the stream: rank `r` of `d` takes samples `step * B + r * B / d ..` of global
//! batch `B`, so a run resumed on another number of ranks continues the same stream. The
//! state is O(blocks); the local shuffle touches only the blocks of one window at a time.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::rng::{permutation, SplitMix64};

/// Where global samples come from.
#[derive(Debug, Clone)]
pub struct GlobalOrder {
    block_tokens: Vec<u64>,
    total_tokens: u64,
    seq_len: u64,
    seed: u64,
    shuffle: bool,
    shuffle_window: u64,
    /// `(epoch, block permutation, prefix sums of token counts in that order)`.
    epoch: Option<(u64, Vec<u32>, Vec<u64>)>,
    /// `(epoch, window, permutation of the window's positions)`.
    window: Option<(u64, u64, Vec<u32>)>,
}

/// One sample: its identity and the blocks its tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleSpan {
    pub epoch: u64,
    /// Sequence index within the epoch's stream (after the block permutation).
    pub sequence: u64,
    /// `(block, token range within the block)`, in stream order; the lengths add up to
    /// `seq_len + 1`.
    pub pieces: Vec<(u32, Range<u64>)>,
}

impl GlobalOrder {
    /// `None` when the blocks hold too few tokens for one sequence.
    pub fn new(
        block_tokens: Vec<u64>,
        seq_len: u64,
        seed: u64,
        shuffle: bool,
        shuffle_window: u64,
    ) -> Option<Self> {
        let total_tokens = block_tokens.iter().sum::<u64>();
        if seq_len == 0 || total_tokens < seq_len + 1 {
            return None;
        }
        Some(GlobalOrder {
            block_tokens,
            total_tokens,
            seq_len,
            seed,
            shuffle,
            shuffle_window: shuffle_window.max(1),
            epoch: None,
            window: None,
        })
    }

    /// Sequences per epoch.
    pub fn samples_per_epoch(&self) -> u64 {
        (self.total_tokens - 1) / self.seq_len
    }

    pub fn seq_len(&self) -> u64 {
        self.seq_len
    }

    fn load_epoch(&mut self, epoch: u64) -> (&[u32], &[u64]) {
        let stale = self.epoch.as_ref().is_none_or(|(e, _, _)| *e != epoch);
        if stale {
            let n = self.block_tokens.len();
            let perm = if self.shuffle {
                permutation(n, SplitMix64::mix(&[self.seed, epoch, 0xB10C]))
            } else {
                (0..n as u32).collect()
            };
            let mut prefix = Vec::with_capacity(n + 1);
            let mut acc = 0u64;
            prefix.push(0);
            for &b in &perm {
                acc += self.block_tokens[b as usize];
                prefix.push(acc);
            }
            self.epoch = Some((epoch, perm, prefix));
        }
        match &self.epoch {
            Some((_, perm, prefix)) => (perm, prefix),
            None => (&[], &[]),
        }
    }

    /// The epoch and sequence index that global sample `i` reads.
    pub fn sequence_of(&mut self, i: u64) -> (u64, u64) {
        let n = self.samples_per_epoch();
        let (epoch, pos) = (i / n, i % n);
        if !self.shuffle {
            return (epoch, pos);
        }
        let w = self.shuffle_window;
        let window = pos / w;
        let start = window * w;
        let stale = self
            .window
            .as_ref()
            .is_none_or(|(e, win, _)| (*e, *win) != (epoch, window));
        if stale {
            let len = w.min(n - start);
            let seed = SplitMix64::mix(&[self.seed, epoch, window, 0x5E0]);
            self.window = Some((epoch, window, permutation(len as usize, seed)));
        }
        let offset = self
            .window
            .as_ref()
            .map_or(0, |(_, _, p)| u64::from(p[(pos - start) as usize]));
        (epoch, start + offset)
    }

    /// The blocks and ranges global sample `i` reads.
    pub fn span(&mut self, i: u64) -> SampleSpan {
        let (epoch, sequence) = self.sequence_of(i);
        let seq_len = self.seq_len;
        let (perm, prefix) = self.load_epoch(epoch);
        let mut start = sequence * seq_len;
        let end = start + seq_len + 1;
        // The last prefix entry not above `start` is the block holding it.
        let mut k = prefix.partition_point(|&p| p <= start) - 1;
        let mut pieces = Vec::new();
        while start < end {
            let block_end = prefix[k + 1];
            let take_end = end.min(block_end);
            if take_end > start {
                pieces.push((perm[k], start - prefix[k]..take_end - prefix[k]));
            }
            start = take_end;
            k += 1;
        }
        SampleSpan {
            epoch,
            sequence,
            pieces,
        }
    }
}

/// The samples rank `rank` of `world` reads at a step of `global_batch` samples starting at
/// global sample `first`. `global_batch` must be a multiple of `world`.
pub fn rank_slice(first: u64, global_batch: u64, rank: u64, world: u64) -> Range<u64> {
    let per_rank = global_batch / world;
    let start = first + rank * per_rank;
    start..start + per_rank
}

/// A 64-bit identity of a sample, for the ledger.
pub fn sample_hash(epoch: u64, sequence: u64) -> u64 {
    SplitMix64::mix(&[0x1ED6E5, epoch, sequence])
}

/// What a run consumed at one step: enough to prove, per epoch, that no sample was seen
/// twice or skipped, across restarts and resizes. Hashes are wrapping sums of
/// [`sample_hash`], so the ranks' partial hashes of a step add up to the step's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub step: u64,
    pub first_sample: u64,
    pub samples: u64,
    pub hash: u64,
}

/// The resume state of a data stream (part of a run's record, hence in `kiln_proto::run`).
pub use kiln_proto::run::DataCursor;

#[cfg(test)]
mod tests {
    use super::*;

    fn order(sizes: &[u64], seq_len: u64, window: u64) -> GlobalOrder {
        GlobalOrder::new(sizes.to_vec(), seq_len, 42, true, window).unwrap()
    }

    #[test]
    fn spans_cover_seq_len_plus_one_tokens_across_blocks() {
        let mut o = order(&[5, 1, 7, 3], 4, 2);
        assert_eq!(o.samples_per_epoch(), 3);
        for i in 0..9 {
            let s = o.span(i);
            let len: u64 = s.pieces.iter().map(|(_, r)| r.end - r.start).sum();
            assert_eq!(len, 5, "sample {i}: {s:?}");
        }
    }

    #[test]
    fn each_epoch_visits_every_sequence_once() {
        let sizes: Vec<u64> = (0..40).map(|i| 50 + (i * 37) % 90).collect();
        let mut o = order(&sizes, 16, 7);
        let n = o.samples_per_epoch();
        for epoch in 0..3 {
            let mut seen: Vec<u64> = (epoch * n..(epoch + 1) * n)
                .map(|i| o.sequence_of(i))
                .map(|(e, j)| {
                    assert_eq!(e, epoch);
                    j
                })
                .collect();
            let in_order = seen.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
            assert_ne!(in_order, seen, "the window shuffle moves samples");
        }
    }

    /// For random world sizes and resume points, reading with d1 ranks up to a step, then with
    /// d2 ranks, consumes exactly the samples of an uninterrupted single-rank run, in the same
    /// global order.
    #[test]
    fn resizing_continues_the_same_stream() {
        let mut rng = SplitMix64::new(9);
        let sizes: Vec<u64> = (0..30).map(|i| 40 + (i * 13) % 60).collect();
        for _ in 0..200 {
            let mut o = order(&sizes, 8, 1 + rng.below(20));
            let worlds = [1u64, 2, 3, 4, 6, 8, 12, 16, 48];
            let d1 = worlds[rng.below(worlds.len() as u64) as usize];
            let d2 = worlds[rng.below(worlds.len() as u64) as usize];
            let batch = 48; // divisible by every world size above
            let steps = 1 + rng.below(12);
            let switch = rng.below(steps + 1);
            let mut resized = Vec::new();
            for step in 0..steps {
                let d = if step < switch { d1 } else { d2 };
                for r in 0..d {
                    for i in rank_slice(step * batch, batch, r, d) {
                        resized.push(o.span(i));
                    }
                }
            }
            let straight: Vec<SampleSpan> = (0..steps * batch).map(|i| o.span(i)).collect();
            assert_eq!(resized, straight, "d1 {d1} -> d2 {d2} at step {switch}");
        }
    }

    #[test]
    fn unshuffled_order_reads_the_stream_in_order() {
        let mut o = GlobalOrder::new(vec![10, 10], 4, 0, false, 1).unwrap();
        assert_eq!(o.span(0).pieces, vec![(0, 0..5)]);
        assert_eq!(o.span(2).pieces, vec![(0, 8..10), (1, 0..3)]);
        assert!(GlobalOrder::new(vec![3], 4, 0, false, 1).is_none());
    }

    #[test]
    fn partial_hashes_of_ranks_add_up() {
        let mut o = order(&[100; 10], 8, 16);
        let mut hash = |r: Range<u64>| {
            r.map(|i| {
                let (e, j) = o.sequence_of(i);
                sample_hash(e, j)
            })
            .fold(0u64, u64::wrapping_add)
        };
        let whole = hash(0..24);
        let parts = (0..4)
            .map(|r| hash(rank_slice(0, 24, r, 4)))
            .fold(0u64, u64::wrapping_add);
        assert_eq!(whole, parts);
    }
}
