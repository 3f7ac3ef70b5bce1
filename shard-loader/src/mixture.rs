//! Mixtures: several datasets read as one stream, each contributing its weight's share of
//! every window of samples, deterministically.
//!
//! Global samples are grouped in chunks of [`CHUNK`]. Each source `d` gets a fixed quota
//! `q_d` of every chunk (largest-remainder rounding of `weight_d / sum * CHUNK`), and the
//! chunk's positions are assigned to sources by a permutation seeded from `(seed, chunk)`.
//! Global sample `i` is then source `d`'s local sample `k`, where `k` counts the earlier
//! samples assigned to `d`; each source streams its own global order. For any range of
//! global samples, each source's local samples are contiguous, so a batch asks each
//! source's loader for one range.

use crate::dataset::Batch;
use crate::loader::StreamingLoader;
use crate::rng::{permutation, SplitMix64};
use crate::shard::ShardError;

/// Samples per chunk of the mixture schedule.
pub const CHUNK: u64 = 1024;

/// Which source each global sample comes from.
#[derive(Debug, Clone)]
pub struct MixtureSchedule {
    quotas: Vec<u64>,
    seed: u64,
    cached: Option<(u64, Vec<u16>)>,
}

impl MixtureSchedule {
    /// `weights` must be positive and finite; at most 65,536 sources.
    pub fn new(weights: &[f64], seed: u64) -> Self {
        let total: f64 = weights.iter().sum();
        let exact: Vec<f64> = weights.iter().map(|w| w / total * CHUNK as f64).collect();
        let mut quotas: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
        let mut left = CHUNK - quotas.iter().sum::<u64>();
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by(|&a, &b| {
            let ra = exact[a] - exact[a].floor();
            let rb = exact[b] - exact[b].floor();
            rb.total_cmp(&ra).then(a.cmp(&b))
        });
        for &d in order.iter().cycle() {
            if left == 0 {
                break;
            }
            quotas[d] += 1;
            left -= 1;
        }
        MixtureSchedule {
            quotas,
            seed,
            cached: None,
        }
    }

    pub fn quotas(&self) -> &[u64] {
        &self.quotas
    }

    fn arrangement(&mut self, chunk: u64) -> &[u16] {
        if self.cached.as_ref().is_none_or(|(c, _)| *c != chunk) {
            let slots: Vec<u16> = self
                .quotas
                .iter()
                .enumerate()
                .flat_map(|(d, &q)| std::iter::repeat_n(d as u16, q as usize))
                .collect();
            let perm = permutation(slots.len(), SplitMix64::mix(&[self.seed, chunk, 0x313]));
            let arranged = perm.iter().map(|&p| slots[p as usize]).collect();
            self.cached = Some((chunk, arranged));
        }
        self.cached.as_ref().map_or(&[], |(_, a)| a)
    }

    /// Samples before global sample `i` that come from source `d`.
    pub fn local_count(&mut self, d: usize, i: u64) -> u64 {
        let (chunk, pos) = (i / CHUNK, (i % CHUNK) as usize);
        let q = self.quotas[d];
        let within = self.arrangement(chunk)[..pos]
            .iter()
            .filter(|&&s| s as usize == d)
            .count() as u64;
        chunk * q + within
    }

    /// The source of global sample `i` and its index in that source's stream.
    pub fn source_of(&mut self, i: u64) -> (usize, u64) {
        let d = self.arrangement(i / CHUNK)[(i % CHUNK) as usize] as usize;
        (d, self.local_count(d, i))
    }
}

/// Several sources read as one stream; one source reads exactly as its own loader.
pub struct MixtureLoader {
    schedule: MixtureSchedule,
    loaders: Vec<StreamingLoader>,
}

impl MixtureLoader {
    pub fn new(loaders: Vec<StreamingLoader>, weights: &[f64], seed: u64) -> Self {
        MixtureLoader {
            schedule: MixtureSchedule::new(weights, seed),
            loaders,
        }
    }

    /// Samples per epoch, summed over the sources.
    pub fn len(&self) -> usize {
        self.loaders.iter().map(StreamingLoader::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Time spent waiting for data since the last call, over all sources.
    pub fn take_wait(&mut self) -> std::time::Duration {
        self.loaders
            .iter_mut()
            .map(StreamingLoader::take_wait)
            .sum()
    }

    /// Global samples `first .. first + count` of the mixture.
    pub fn batch(&mut self, first: u64, count: usize) -> Result<Batch, ShardError> {
        if self.loaders.len() == 1 {
            return self.loaders[0].batch(first, count);
        }
        let end = first + count as u64;
        let mut parts = Vec::with_capacity(self.loaders.len());
        for d in 0..self.loaders.len() {
            let a = self.schedule.local_count(d, first);
            let b = self.schedule.local_count(d, end);
            let part = if b > a {
                Some(self.loaders[d].batch(a, (b - a) as usize)?)
            } else {
                None
            };
            parts.push((a, part));
        }
        let t = parts
            .iter()
            .find_map(|(_, p)| p.as_ref().map(|p| p.seq_len))
            .unwrap_or(0);
        let mut batch = Batch::with_capacity(count, t);
        for (d, (_, part)) in parts.iter().enumerate() {
            if let Some(p) = part {
                // Distinguish sources in the ledger: the same sequence of two datasets is two
                // samples.
                let salt = SplitMix64::mix(&[0x50C, d as u64]).wrapping_mul(p.batch_size as u64);
                batch.hash = batch.hash.wrapping_add(p.hash).wrapping_add(salt);
            }
        }
        for i in first..end {
            let (d, k) = self.schedule.source_of(i);
            let (a, part) = &parts[d];
            let Some(p) = part else { continue };
            let row = (k - a) as usize;
            batch
                .inputs
                .extend_from_slice(&p.inputs[row * t..(row + 1) * t]);
            batch
                .targets
                .extend_from_slice(&p.targets[row * t..(row + 1) * t]);
            batch.samples.push(i);
        }
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_follow_the_weights_and_fill_the_chunk() {
        let s = MixtureSchedule::new(&[0.7, 0.2, 0.1], 1);
        assert_eq!(s.quotas(), &[717, 205, 102]);
        let s = MixtureSchedule::new(&[1.0, 1.0, 1.0], 1);
        assert_eq!(s.quotas().iter().sum::<u64>(), CHUNK);
    }

    #[test]
    fn local_indices_are_dense_and_contiguous_per_source() {
        let mut s = MixtureSchedule::new(&[3.0, 1.0], 9);
        let mut next = [0u64; 2];
        for i in 0..5000 {
            let (d, k) = s.source_of(i);
            assert_eq!(k, next[d], "sample {i}");
            next[d] += 1;
        }
        assert_eq!(s.local_count(0, 5000), next[0]);
        assert_eq!(s.local_count(1, 5000), next[1]);
        // Weights hold within each chunk.
        assert_eq!(s.local_count(1, 2 * CHUNK), 2 * 256);
    }
}
