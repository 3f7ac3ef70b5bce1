//! Mean next-token cross-entropy of a model over a token stream.

use kiln_shard_loader::mixture::MixtureLoader;
use kiln_shard_loader::ShardError;
use serde::Serialize;
use tch::Tensor;

use crate::collective::CollectiveError;
use crate::model::Llama;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean cross-entropy per predicted token, in nats.
    pub loss: f64,
    /// Predicted tokens the mean is over.
    pub tokens: u64,
    pub sequences: u64,
}

/// Evaluates sequences `0..n` of `sampler` (all of them when `max_sequences` is `None`), in
/// batches of `batch_size`, with bf16 autocast when `bf16`.
pub fn evaluate(
    model: &Llama,
    sampler: &mut MixtureLoader,
    batch_size: usize,
    max_sequences: Option<usize>,
    bf16: bool,
) -> Result<EvalResult, EvalError> {
    let n = max_sequences.map_or(sampler.len(), |m| m.min(sampler.len()).max(1));
    let device = model.device();
    let mut total = 0.0f64;
    let mut tokens = 0u64;
    tch::no_grad(|| -> Result<(), EvalError> {
        let mut first = 0usize;
        while first < n {
            let b = batch_size.min(n - first);
            let batch = sampler.batch(first as u64, b)?;
            let shape = [b as i64, batch.seq_len as i64];
            let inputs = Tensor::from_slice(&batch.inputs)
                .view(shape)
                .to_device(device);
            let targets = Tensor::from_slice(&batch.targets)
                .view(shape)
                .to_device(device);
            let loss =
                crate::precision::autocast(bf16, device, || model.loss_value(&inputs, &targets))?;
            let count = (b * batch.seq_len) as u64;
            total += loss * count as f64;
            tokens += count;
            first += b;
        }
        Ok(())
    })?;
    Ok(EvalResult {
        loss: total / tokens.max(1) as f64,
        tokens,
        sequences: n as u64,
    })
}
