//! A prepared dataset opened for training.
//!
//! [`TokenDataset::open`] reads the manifest; [`TokenDataset::load_split`] reads a split's
//! shards, checking each file's SHA-256, its document and token counts, and every token id
//! against the vocabulary, and concatenates the documents (each ends with EOS) into one
//! token stream. [`SequenceSampler`] cuts that stream into fixed-length sequences and defines
//! global sample `i` for every `i`: epoch `i / n` visits the `n` sequences in a permutation
//! seeded by `(seed, epoch)`.
//!
//! This whole-split-in-memory reader is sized for datasets that fit in RAM.

use std::path::{Path, PathBuf};

use kiln_proto::manifest::{Manifest, ManifestError, Split};

use crate::rng::{permutation, SplitMix64};
use crate::shard::{file_sha256, read_shard, ShardError};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(
        "the {split} split of {dir} has {tokens} tokens, too few for one sequence of {seq_len} tokens"
    )]
    TooSmall {
        dir: PathBuf,
        split: &'static str,
        tokens: usize,
        seq_len: usize,
    },
}

/// Which part of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitName {
    Train,
    Validation,
}

impl SplitName {
    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Validation => "validation",
        }
    }
}

pub struct TokenDataset {
    dir: PathBuf,
    manifest: Manifest,
}

impl TokenDataset {
    pub fn open(dir: &Path) -> Result<Self, DatasetError> {
        Ok(TokenDataset {
            dir: dir.to_owned(),
            manifest: Manifest::load(dir)?,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn split(&self, name: SplitName) -> &Split {
        match name {
            SplitName::Train => &self.manifest.train,
            SplitName::Validation => &self.manifest.validation,
        }
    }

    /// Checks every shard of both splits (checksum, counts, token ranges) without keeping
    /// the tokens.
    pub fn verify(&self) -> Result<(), DatasetError> {
        for name in [SplitName::Train, SplitName::Validation] {
            self.load_split(name)?;
        }
        Ok(())
    }

    /// All tokens of a split, documents in manifest order.
    pub fn load_split(&self, name: SplitName) -> Result<Vec<u32>, DatasetError> {
        let m = &self.manifest;
        let mut tokens = Vec::with_capacity(self.split(name).tokens as usize);
        for shard in &self.split(name).shards {
            let path = self.dir.join(&shard.path);
            let (bytes, sha256) = file_sha256(&path)?;
            if sha256 != shard.sha256 {
                return Err(ShardError::Checksum {
                    path,
                    expected: shard.sha256.clone(),
                    actual: format!("{sha256} ({bytes} bytes)"),
                }
                .into());
            }
            let got = read_shard(&path, &m.token_column, m.vocab_size)?;
            let counts = [
                ("documents", shard.documents, got.doc_ids.len() as u64),
                ("tokens", shard.tokens, got.tokens.len() as u64),
            ];
            for (field, expected, actual) in counts {
                if expected != actual {
                    return Err(ShardError::CountMismatch {
                        path,
                        field,
                        expected,
                        actual,
                    }
                    .into());
                }
            }
            tokens.extend_from_slice(&got.tokens);
        }
        Ok(tokens)
    }

    /// A sampler over a split, or an error naming the split if it is too small.
    pub fn sampler(
        &self,
        name: SplitName,
        seq_len: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<SequenceSampler, DatasetError> {
        let tokens = self.load_split(name)?;
        SequenceSampler::new(tokens, seq_len, seed, shuffle).ok_or_else(|| DatasetError::TooSmall {
            dir: self.dir.clone(),
            split: name.as_str(),
            tokens: self.split(name).tokens as usize,
            seq_len,
        })
    }
}

/// One batch: `inputs[b * seq_len + t]` predicts `targets[b * seq_len + t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    /// The global sample index of each row.
    pub samples: Vec<u64>,
}

/// Fixed-length sequences over a token stream, in a seeded order per epoch.
pub struct SequenceSampler {
    tokens: Vec<u32>,
    seq_len: usize,
    seed: u64,
    shuffle: bool,
    epoch_order: Option<(u64, Vec<u32>)>,
}

impl SequenceSampler {
    /// `None` when the stream cannot hold one sequence plus its shifted target.
    pub fn new(tokens: Vec<u32>, seq_len: usize, seed: u64, shuffle: bool) -> Option<Self> {
        if seq_len == 0 || tokens.len() < seq_len + 1 {
            return None;
        }
        Some(SequenceSampler {
            tokens,
            seq_len,
            seed,
            shuffle,
            epoch_order: None,
        })
    }

    /// Sequences per epoch.
    pub fn len(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sequence (start offset in the stream) that global sample `i` reads.
    pub fn sequence_of(&mut self, i: u64) -> usize {
        let n = self.len() as u64;
        let (epoch, pos) = (i / n, (i % n) as usize);
        if !self.shuffle {
            return pos;
        }
        let stale = self.epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch);
        if stale {
            let seed = SplitMix64::mix(&[self.seed, epoch]);
            self.epoch_order = Some((epoch, permutation(n as usize, seed)));
        }
        self.epoch_order
            .as_ref()
            .map_or(pos, |(_, p)| p[pos] as usize)
    }

    /// Global samples `first .. first + batch_size`.
    pub fn batch(&mut self, first: u64, batch_size: usize) -> Batch {
        let t = self.seq_len;
        let mut batch = Batch {
            batch_size,
            seq_len: t,
            inputs: Vec::with_capacity(batch_size * t),
            targets: Vec::with_capacity(batch_size * t),
            samples: Vec::with_capacity(batch_size),
        };
        for i in first..first + batch_size as u64 {
            let start = self.sequence_of(i) * t;
            let window = &self.tokens[start..start + t + 1];
            batch.inputs.extend(window[..t].iter().map(|&x| x as i64));
            batch.targets.extend(window[1..].iter().map(|&x| x as i64));
            batch.samples.push(i);
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sequence_once_per_epoch_and_targets_shift_by_one() {
        let tokens: Vec<u32> = (0..101).collect();
        let mut s = SequenceSampler::new(tokens, 10, 3, true).unwrap();
        assert_eq!(s.len(), 10);
        let b = s.batch(0, 10);
        let mut starts: Vec<i64> = b.inputs.chunks(10).map(|c| c[0]).collect();
        assert_ne!(
            starts,
            (0..10).map(|i| i * 10).collect::<Vec<_>>(),
            "shuffled"
        );
        starts.sort_unstable();
        assert_eq!(starts, (0..10).map(|i| i * 10).collect::<Vec<_>>());
        for (x, y) in b.inputs.iter().zip(&b.targets) {
            assert_eq!(x + 1, *y);
        }
        // The next epoch has its own order, and the same seed gives the same stream.
        let again = SequenceSampler::new((0..101).collect(), 10, 3, true)
            .unwrap()
            .batch(0, 20);
        assert_eq!(&again.inputs[..100], &b.inputs[..]);
        assert_ne!(&again.inputs[100..], &b.inputs[..]);
    }

    #[test]
    fn unshuffled_sampler_reads_in_order() {
        let mut s = SequenceSampler::new((0..50).collect(), 7, 0, false).unwrap();
        assert_eq!(s.batch(1, 1).inputs, (7..14).collect::<Vec<i64>>());
        assert!(SequenceSampler::new((0..7).collect(), 7, 0, false).is_none());
    }
}
