//! Bytes per rank, as Kiln allocates them (see the module docs of [`super`]).

use std::ops::Range;

use crate::config::LlamaConfig;
use crate::model::Recompute;
use crate::parallel::plan_buckets;

use super::timing::timing;
use super::*;

/// Bytes per token one block keeps, by half: `(attention half, MLP half, block input)`.
fn block_bytes(s: &Shape, tp: usize, cuda: bool) -> (f64, f64, f64) {
    let c = &s.model;
    let tp = tp as f64;
    let d = c.dim as f64;
    let heads = c.n_heads as f64 / tp;
    let q = heads * c.head_dim as f64;
    let kv = c.n_kv_heads as f64 / tp * c.head_dim as f64;
    let f = c.ffn_dim as f64 / tp;
    // Matmul outputs are in autocast's dtype; the residual stream and the norms are fp32,
    // and each linear layer keeps its own bf16 cast of a norm's output.
    let a = if s.bf16 { 2.0 } else { 4.0 };
    let cast = if s.bf16 { 2.0 } else { 0.0 };
    // The flash kernels keep q, k, v, their output and its log-sum-exp in autocast's dtype;
    // the math kernel keeps q, k, v and the probabilities, computed in fp32 whatever the
    // inputs (PyTorch's default for reduced precision on that path).
    let kernel = if cuda {
        a * (q + 2.0 * kv) + a * q + 4.0 * heads
    } else {
        4.0 * (q + 2.0 * kv) + 4.0 * heads * s.seq_len as f64
    };
    // h1, its casts for q/k/v, the kernel's, the heads' output reshaped, o's output, x2, the
    // norm's 1/rms.
    let attn = 4.0 * d + 3.0 * cast * d + kernel + a * q + a * d + 4.0 * d + 4.0;
    // h2, its casts for gate/up, gate, silu(gate), up, their product, down's output, x3.
    let mlp = 4.0 * d + 2.0 * cast * d + 4.0 * a * f + a * d + 4.0 * d + 4.0;
    (attn, mlp, 4.0 * d)
}

/// Flat-buffer lengths of the parameter store's segments on one tensor-parallel rank, in
/// order (embedding, blocks, head), as `Llama::build` lays them out.
fn segments(c: &LlamaConfig, tp: usize) -> Vec<Range<i64>> {
    let t = tp as i64;
    let vocab = (c.vocab_size + t - 1) / t;
    let embed = vocab * c.dim;
    let block = (c.block_params() - 2 * c.dim) / t + 2 * c.dim;
    let head = c.dim + if c.tie_embeddings { 0 } else { embed };
    let mut lens = vec![embed];
    lens.extend(std::iter::repeat_n(block, c.n_layers as usize));
    lens.push(head);
    let mut start = 0;
    lens.into_iter()
        .map(|n| {
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// Memory, work and time of `layout` for `shape` on `hw`.
pub fn estimate(shape: &Shape, layout: &Layout, hw: &Hardware) -> Estimate {
    let c = &shape.model;
    let cuda = hw.device == "cuda";
    let tp = layout.tp;
    let segs = segments(c, tp);
    let recompute = Recompute::parse(&layout.activation_checkpointing).unwrap_or_default();
    let mut m = state_memory(shape, layout, &segs, recompute);
    let tokens = (layout.micro_batch_size * shape.seq_len) as f64;
    let layers = c.n_layers as f64;
    let (attn, mlp, input) = block_bytes(shape, tp, cuda);
    let kept = match recompute {
        Recompute::None => attn + mlp,
        Recompute::Mlp => attn + input,
        Recompute::Block => input,
    };
    let recomputed = match recompute {
        Recompute::None => 0.0,
        Recompute::Mlp => mlp,
        Recompute::Block => attn + mlp,
    };
    // The embedding's output, the final norm's output and its gradient.
    let ends = 3.0 * 4.0 * c.dim as f64;
    m.activations = tokens * (layers * kept + ends);
    m.activations_without_recompute = tokens * (layers * (attn + mlp) + ends);
    // Gradients flowing through one half at a time: about that half's size again.
    m.backward_working_set = tokens * (recomputed + attn.max(mlp));
    let vocab_local = (c.vocab_size as f64 / tp as f64).ceil();
    m.loss = if tp == 1 {
        let chunk = if cuda { GIB } else { 16.0 * MIB };
        let chunk = chunk.min(4.0 * tokens * vocab_local);
        // Under bf16: the head weight and the hidden states cast once, the chunk's matmul
        // output before its fp32 copy.
        let low = if shape.bf16 {
            2.0 * vocab_local * c.dim as f64 + 2.0 * tokens * c.dim as f64 + chunk / 2.0
        } else {
            0.0
        };
        chunk + low
    } else {
        // Logits, their exponentials, and in the backward pass the gradients of both, fp32,
        // over this rank's vocabulary.
        4.0 * 4.0 * tokens * vocab_local
    } + 4.0 * vocab_local * c.dim as f64; // the head weight's fp32 gradient
    m.runtime = if cuda {
        CUDA_RUNTIME_BYTES
    } else {
        CPU_RUNTIME_BYTES
    };
    // The largest whole tensor: the embedding (or the head, the same size).
    let largest = 4.0 * (c.vocab_size * c.dim) as f64;
    // Its host bytes; under tensor parallelism the gather's padded input, its output, the
    // concatenation and the bytes; fully sharded, the largest segment gathered as well.
    m.final_weights = if tp == 1 { largest } else { 4.0 * largest }
        + if layout.fsdp {
            4.0 * segs.iter().map(|r| r.end - r.start).max().unwrap_or(0) as f64
        } else {
            0.0
        };
    let state = m.parameters + m.gradients + m.optimizer_state + m.optimizer_scratch + m.runtime;
    let training = m.low_precision_weights + m.activations + m.backward_working_set + m.loss;
    m.total = state
        + if cuda {
            training
        } else {
            training.max(m.final_weights)
        };

    let t = timing(shape, layout, hw, &segs, recompute);
    Estimate {
        layout: layout.clone(),
        fits: m.total <= hw.memory_bytes,
        memory: m,
        flops_per_token: t.flops_per_token,
        executed_flops_per_token: t.executed,
        accumulation_steps: t.accumulation_steps,
        compute_s: t.compute_s,
        tp_comm_s: t.tp_comm_s,
        dp_comm_s: t.dp_comm_s,
        step_s: t.step_s,
        tokens_per_s: t.tokens_per_s,
    }
}

/// The state a rank holds whatever the micro-batch: parameters, gradients, AdamW's state
/// and scratch, bf16 weight copies (the other fields zero).
fn state_memory(
    shape: &Shape,
    layout: &Layout,
    segs: &[Range<i64>],
    recompute: Recompute,
) -> Memory {
    let c = &shape.model;
    let dp = layout.dp;
    let local = segs.last().map_or(0, |r| r.end) as f64;
    let mut m = Memory {
        parameters: 4.0 * local,
        gradients: 4.0 * local,
        ..Memory::default()
    };
    if layout.fsdp {
        let group = layout.shard_group();
        let chunk = |r: &Range<i64>| ((r.end - r.start) as f64 / group as f64).ceil();
        let owned: f64 = segs.iter().map(chunk).sum();
        let longest = segs.iter().map(chunk).fold(0.0, f64::max);
        let len = |r: Option<&Range<i64>>| r.map_or(0.0, |r| (r.end - r.start) as f64);
        let (embed, block, head) = (len(segs.first()), len(segs.get(1)), len(segs.last()));
        // Whole at a time: the embedding, the head and two blocks (the one running and the
        // one prefetched) when blocks are freed after their forward pass, by recomputation
        // or resharding; otherwise every block at the end of the forward pass.
        let two_blocks = embed + head + 2.0 * block;
        let gathered = if recompute == Recompute::Block || layout.reshard_after_forward {
            two_blocks
        } else {
            local
        };
        let whole_grads = 2.0 * block + if c.tie_embeddings { embed } else { head };
        m.parameters = 4.0 * (owned + gathered);
        m.gradients = 4.0 * (owned + whole_grads);
        m.optimizer_state = 8.0 * owned;
        m.optimizer_scratch = 4.0 * longest;
        if shape.bf16 {
            // Without recomputation the linear layers keep every block's bf16 copies for
            // the backward pass, resharded or not.
            m.low_precision_weights = 2.0
                * if recompute == Recompute::Block {
                    two_blocks
                } else {
                    local
                };
        }
    } else if layout.zero1 && dp > 1 {
        let buckets = plan_buckets(segs, (shape.bucket_mb * MIB) as u64);
        let chunk = |len: i64| (len as f64 / dp as f64).ceil();
        let owned: f64 = buckets
            .iter()
            .map(|b| chunk(b.range.end - b.range.start))
            .sum();
        let longest = buckets
            .iter()
            .map(|b| chunk(b.range.end - b.range.start))
            .fold(0.0, f64::max);
        m.optimizer_state = 8.0 * owned;
        m.optimizer_scratch = 4.0 * longest;
    } else {
        m.optimizer_state = 8.0 * local;
        m.optimizer_scratch = 4.0 * local;
    }
    if shape.bf16 && !layout.fsdp {
        m.low_precision_weights = 2.0 * local;
    }
    m
}

impl Memory {
    /// The largest of what training holds, by name.
    pub fn largest(&self) -> (&'static str, f64) {
        [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("bf16 weight copies", self.low_precision_weights),
            ("activations", self.activations),
            ("the backward working set", self.backward_working_set),
            ("the loss", self.loss),
        ]
        .into_iter()
        .fold(("nothing", 0.0), |a, b| if b.1 > a.1 { b } else { a })
    }
}
