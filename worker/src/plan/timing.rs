//! Step time and work: compute at the device's peak, and the traffic it cannot hide.

use std::ops::Range;

use crate::model::Recompute;

use super::*;

/// Step time and work, from [`estimate`].
pub(super) struct Timing {
    pub(super) flops_per_token: f64,
    pub(super) executed: f64,
    pub(super) accumulation_steps: i64,
    pub(super) compute_s: f64,
    pub(super) tp_comm_s: f64,
    pub(super) dp_comm_s: f64,
    pub(super) step_s: f64,
    pub(super) tokens_per_s: f64,
}

pub(super) fn timing(
    shape: &Shape,
    layout: &Layout,
    hw: &Hardware,
    segs: &[Range<i64>],
    recompute: Recompute,
) -> Timing {
    let c = &shape.model;
    let (tp, dp) = (layout.tp, layout.dp);
    let layers = c.n_layers as f64;
    let local = segs.last().map_or(0, |r| r.end) as f64;
    let flops_per_token = c.flops_per_token(shape.seq_len);
    let attn_fwd = 4.0 * (c.n_heads * c.head_dim * shape.seq_len) as f64;
    let mlp_fwd = 2.0 * 3.0 * (c.dim * c.ffn_dim) as f64;
    let block_fwd = 2.0 * c.block_params() as f64 + attn_fwd;
    let extra = layers
        * match recompute {
            Recompute::None => 0.0,
            Recompute::Mlp => mlp_fwd,
            Recompute::Block => block_fwd,
        };
    let executed = flops_per_token + extra;
    let step_tokens = (shape.batch_size * shape.seq_len) as f64;
    let rank_tokens = step_tokens / dp as f64;
    let compute_s = rank_tokens * executed / tp as f64 / (hw.peak_tflops * 1e12 * hw.mfu);
    let bytes_per_s = hw.link_gbps * 1e9 / 8.0;
    let ring = |n: usize| 2.0 * (n as f64 - 1.0) / n as f64;
    // Tensor parallelism: per block two all-reduces of [tokens, dim] forward and two
    // backward, in the activations' dtype, on the critical path (again when recomputed).
    let act = if shape.bf16 { 2.0 } else { 4.0 };
    let per_block = match recompute {
        Recompute::Block => 6.0,
        _ => 4.0,
    };
    let tp_comm_s = if tp > 1 {
        layers * per_block * ring(tp) * act * rank_tokens * c.dim as f64 / bytes_per_s
    } else {
        0.0
    };
    // Data parallelism: the fp32 gradients once per step (an all-reduce, or ZeRO-1's
    // reduce-scatter and all-gather: the same bytes), overlapped with the backward pass,
    // which is two thirds of the compute.
    let dp_comm = if dp > 1 {
        ring(dp) * 4.0 * local / bytes_per_s
    } else {
        0.0
    };
    let accumulation_steps =
        (shape.batch_size / (dp as i64 * layout.micro_batch_size).max(1)).max(1);
    let dp_comm_s = if layout.fsdp && dp > 1 {
        // Every micro-batch gathers the parameters for its forward pass (overlapped with
        // it, a third of the compute), again for its backward with block recomputation,
        // and reduce-scatters the gradients (overlapped with the backward pass). A gather
        // or a reduce-scatter moves half an all-reduce's bytes, over the shard group. With
        // hybrid sharding each reduced chunk is then all-reduced over the replicas.
        let (group, replicas) = (layout.shard_group(), dp / layout.shard_group());
        let micro = accumulation_steps as f64;
        let pass = ring(group) / 2.0 * 4.0 * local / bytes_per_s * micro;
        let across = if replicas > 1 {
            ring(replicas) * 4.0 * local / group as f64 / bytes_per_s * micro
        } else {
            0.0
        };
        let backward =
            pass * if recompute == Recompute::Block || layout.reshard_after_forward {
                2.0
            } else {
                1.0
            } + across;
        (pass - compute_s / 3.0).max(0.0)
            + (backward - compute_s * 2.0 / 3.0).max(0.0)
            // The first gather and the last reduce-scatter cannot overlap.
            + 2.0 * pass / (segs.len() as f64).max(1.0)
    } else if dp > 1 {
        (dp_comm - compute_s * 2.0 / 3.0).max(0.0)
            // The last bucket cannot overlap.
            + dp_comm / (segs.len() as f64).max(1.0)
    } else {
        0.0
    };
    let step_s = compute_s + tp_comm_s + dp_comm_s;
    Timing {
        flops_per_token,
        executed,
        accumulation_steps,
        compute_s,
        tp_comm_s,
        dp_comm_s,
        step_s,
        tokens_per_s: step_tokens / step_s,
    }
}
