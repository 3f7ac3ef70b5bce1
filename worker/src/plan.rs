//! `kiln plan`: what a job needs on each rank before any device is rented, from arithmetic
//! alone (nothing is allocated, no library is loaded): memory broken down as Kiln allocates
//! it, FLOPs per token, a step time predicted from a device peak and a link bandwidth, and
//! which meshes of N devices fit.
//!
//! The memory model follows the code, so it changes with it:
//!
//! - the flat fp32 parameter and gradient buffers (`params`), each `4 * P / tp` bytes; fully
//!   sharded (`fsdp`), this rank's chunk of each segment, plus what is whole at the peak:
//!   every block's parameters gathered at the end of the forward pass (autograd holds them
//!   until each block's backward), or with block recomputation the embedding, the head and
//!   two blocks (the one running and the one prefetched); and the whole gradients of the
//!   segments in backward or waiting for their reduce-scatter (two blocks, and the tied
//!   embedding's from the head's backward on);
//! - AdamW's two moments, `8 * P / tp` bytes, divided by `dp` with ZeRO-1, and its scratch
//!   buffer, as long as the longest range it updates (the whole buffer without ZeRO-1, this
//!   rank's chunk of the largest gradient bucket with it: `optim`, `parallel::plan_buckets`);
//! - under bf16 autocast, the bf16 copies of the weights autocast makes in the forward pass,
//!   which the linear layers keep for their backward (`2 * P / tp`);
//! - activations: what each block's pieces keep for the backward pass (`model::tape`), by
//!   tensor, in the dtype autocast gives it, at the job's micro-batch; with recomputation
//!   only a block's input (or its attention half) is kept, and the block being recomputed
//!   adds one block's worth during the backward pass. Attention keeps its probabilities
//!   (`[heads, seq, seq]`, PyTorch's math kernel, which the CPU runs) or only its output and
//!   log-sum-exp (the flash kernels CUDA runs);
//! - the output head's loss: the chunk of logits it holds (16 MiB on the CPU, 1 GiB on
//!   CUDA: `model::loss`), or under tensor parallelism the vocabulary-parallel logits, and
//!   the head weight's gradient, made in the forward pass and held until the backward's;
//! - the runtime: libtorch and the loader on the CPU (measured, see the README), the CUDA
//!   context, cuBLAS workspace and NCCL buffers on a GPU (assumed);
//! - after the last step, on the first rank, writing the final weights a tensor at a time
//!   (host memory): on the
//!   CPU that phase is the peak when it adds more than training's activations did.
//!
//! Step time is `compute + tensor-parallel traffic + what of the data-parallel traffic the
//! backward pass cannot hide`: compute is the FLOPs each rank runs (recomputation included)
//! at `peak * mfu`, traffic is bytes over `link_gbps` with ring all-reduce costs.

use std::fmt::Write as _;
use std::ops::Range;

use serde::Serialize;

use crate::config::LlamaConfig;
use crate::model::Recompute;
use crate::parallel::plan_buckets;
use kiln_proto::job::JobConfig;

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Resident memory of a `kiln train` rank on the CPU besides its model's: libtorch, the
/// loader, the collectives, the metrics and control threads. Measured (`benches/plan.sh`):
/// a rank of the `tiny` preset (with GPT-2's vocabulary) at dp 2 peaked at 574 MiB, of
/// which the model's terms here are 118 MiB.
pub const CPU_RUNTIME_BYTES: f64 = 456.0 * MIB;
/// On a GPU: the CUDA context, cuBLAS workspaces, NCCL's buffers and the caching
/// allocator's slack. Assumed, not measured here.
pub const CUDA_RUNTIME_BYTES: f64 = 2.0 * GIB;

/// What the planned ranks run on.
#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    /// `cpu` or `cuda`.
    pub device: String,
    /// Devices (processes) in all.
    pub devices: usize,
    /// Memory of one device, bytes.
    pub memory_bytes: f64,
    /// Dense peak of one device in the run's precision, TFLOP/s.
    pub peak_tflops: f64,
    /// The fraction of the peak a step's FLOPs reach.
    pub mfu: f64,
    /// Bandwidth of one device's link to its peers, Gbit/s, each way.
    pub link_gbps: f64,
}

/// One way to lay the job out on the devices.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layout {
    pub dp: usize,
    pub tp: usize,
    pub zero1: bool,
    /// Fully sharded data parallelism.
    pub fsdp: bool,
    /// `none`, `mlp` or `block`.
    pub activation_checkpointing: String,
    pub micro_batch_size: i64,
}

/// Bytes per rank, by what holds them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    pub parameters: f64,
    pub gradients: f64,
    pub optimizer_state: f64,
    pub optimizer_scratch: f64,
    /// bf16 weight copies kept by autocast for the backward pass.
    pub low_precision_weights: f64,
    /// Kept by one micro-batch's forward pass, with the job's recomputation.
    pub activations: f64,
    /// The same without recomputation.
    pub activations_without_recompute: f64,
    /// During the backward pass: the block recomputed and the gradients in flight.
    pub backward_working_set: f64,
    /// The output head's loss.
    pub loss: f64,
    pub runtime: f64,
    /// Host memory the first rank adds after the last step to write the final weights, which
    /// go out a tensor at a time (`hf::HfWriter`): the host copy of the largest tensor and,
    /// under tensor parallelism, the buffers gathering it; fully sharded, its gathered
    /// segment too. On the CPU it counts towards `total` when
    /// it is larger than what training adds (activations, working set, loss); on a GPU it
    /// is host memory and does not.
    pub final_weights: f64,
    /// The largest of training and writing the final weights.
    pub total: f64,
}

/// A layout's memory, work and predicted speed.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub layout: Layout,
    pub memory: Memory,
    /// Model FLOPs per token (6N plus attention, as MFU counts them).
    pub flops_per_token: f64,
    /// FLOPs per token each step runs, recomputation included.
    pub executed_flops_per_token: f64,
    pub accumulation_steps: i64,
    pub compute_s: f64,
    pub tp_comm_s: f64,
    pub dp_comm_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub fits: bool,
}

/// The job's own layout, the meshes of the devices that fit, and, when the job's does not,
/// the smallest change that would.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub job: String,
    pub params: i64,
    pub seq_len: i64,
    pub batch_size: i64,
    pub bf16: bool,
    pub hardware: Hardware,
    pub estimate: Estimate,
    /// Every layout tried on `hardware.devices`, fitting or not, fastest first.
    pub meshes: Vec<Estimate>,
    /// When the job's layout does not fit: the first of the changes tried that fits,
    /// in words.
    pub suggestion: Option<String>,
}

/// The job's shape without its layout.
#[derive(Debug, Clone)]
pub struct Shape {
    pub model: LlamaConfig,
    pub seq_len: i64,
    pub batch_size: i64,
    pub bf16: bool,
    pub bucket_mb: f64,
}

impl Shape {
    pub fn of(job: &JobConfig, model: LlamaConfig, device: &str) -> Shape {
        let planned = if device == "cuda" {
            tch::Device::Cuda(0)
        } else {
            tch::Device::Cpu
        };
        let bf16 = crate::device::resolve_bf16(&job.train.precision, planned);
        Shape {
            model,
            seq_len: job.train.seq_len,
            batch_size: job.train.batch_size,
            bf16,
            bucket_mb: job.parallel.bucket_mb,
        }
    }
}

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
        let chunk = |r: &Range<i64>| ((r.end - r.start) as f64 / dp as f64).ceil();
        let owned: f64 = segs.iter().map(chunk).sum();
        let longest = segs.iter().map(chunk).fold(0.0, f64::max);
        let len = |r: Option<&Range<i64>>| r.map_or(0.0, |r| (r.end - r.start) as f64);
        let (embed, block, head) = (len(segs.first()), len(segs.get(1)), len(segs.last()));
        let gathered = if recompute == Recompute::Block {
            embed + head + 2.0 * block
        } else {
            local
        };
        let whole_grads = 2.0 * block + if c.tie_embeddings { embed } else { head };
        m.parameters = 4.0 * (owned + gathered);
        m.gradients = 4.0 * (owned + whole_grads);
        m.optimizer_state = 8.0 * owned;
        m.optimizer_scratch = 4.0 * longest;
        if shape.bf16 {
            m.low_precision_weights = 2.0 * gathered;
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

/// Step time and work, from [`estimate`].
struct Timing {
    flops_per_token: f64,
    executed: f64,
    accumulation_steps: i64,
    compute_s: f64,
    tp_comm_s: f64,
    dp_comm_s: f64,
    step_s: f64,
    tokens_per_s: f64,
}

fn timing(
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
        // or a reduce-scatter moves half an all-reduce's bytes.
        let pass = dp_comm / 2.0 * accumulation_steps as f64;
        let backward = pass
            * if recompute == Recompute::Block {
                2.0
            } else {
                1.0
            };
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

/// Whether `layout` is one Kiln can run for `shape`: tensor parallelism dividing the heads
/// and the MLP, the batch split evenly into micro-batches.
fn valid(shape: &Shape, l: &Layout) -> bool {
    shape.model.check_tensor_parallel(l.tp).is_ok()
        && l.micro_batch_size >= 1
        && shape.batch_size % (l.dp as i64 * l.micro_batch_size) == 0
}

/// Plans `job` (`layout` being its own) on `hw`.
pub fn plan(job: &JobConfig, shape: Shape, layout: Layout, hw: Hardware) -> Plan {
    let estimate = estimate(&shape, &layout, &hw);
    let mut meshes = Vec::new();
    let n = hw.devices;
    for tp in (1..=n.min(8)).filter(|t| n.is_multiple_of(*t)) {
        let dp = n / tp;
        for (zero1, fsdp) in [(false, false), (true, false), (false, true)] {
            if (zero1 || fsdp) && dp == 1 {
                continue;
            }
            for ac in ["none", "mlp", "block"] {
                let l = Layout {
                    dp,
                    tp,
                    zero1,
                    fsdp,
                    activation_checkpointing: ac.into(),
                    micro_batch_size: layout.micro_batch_size.min(shape.batch_size / dp as i64),
                };
                if valid(&shape, &l) {
                    meshes.push(self::estimate(&shape, &l, &hw));
                }
            }
        }
    }
    meshes.sort_by(|a, b| {
        (!a.fits, a.step_s)
            .partial_cmp(&(!b.fits, b.step_s))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let suggestion = (!estimate.fits).then(|| suggest(&shape, &layout, &hw, &meshes));
    Plan {
        job: job.name.clone(),
        params: shape.model.num_params(),
        seq_len: shape.seq_len,
        batch_size: shape.batch_size,
        bf16: shape.bf16,
        hardware: hw,
        estimate,
        meshes,
        suggestion,
    }
}

/// The first single change to `layout` that fits, in the order of what it costs: more
/// recomputation, ZeRO-1, full sharding, a smaller micro-batch, another mesh, then more
/// devices.
fn suggest(shape: &Shape, layout: &Layout, hw: &Hardware, meshes: &[Estimate]) -> String {
    let fits = |l: &Layout, hw: &Hardware| valid(shape, l) && estimate(shape, l, hw).fits;
    let mut tries: Vec<(String, Layout)> = Vec::new();
    for ac in ["mlp", "block"] {
        if layout.activation_checkpointing == "none"
            || (layout.activation_checkpointing == "mlp" && ac == "block")
        {
            tries.push((
                format!("train.activation_checkpointing = \"{ac}\""),
                Layout {
                    activation_checkpointing: ac.into(),
                    ..layout.clone()
                },
            ));
        }
    }
    if !layout.zero1 && !layout.fsdp && layout.dp > 1 {
        tries.push((
            "parallel.zero1 = true".into(),
            Layout {
                zero1: true,
                ..layout.clone()
            },
        ));
    }
    if !layout.fsdp && layout.dp > 1 {
        tries.push((
            "parallel.fsdp = true".into(),
            Layout {
                zero1: false,
                fsdp: true,
                ..layout.clone()
            },
        ));
    }
    let mut micro = layout.micro_batch_size / 2;
    while micro >= 1 {
        tries.push((
            format!("train.micro_batch_size = {micro}"),
            Layout {
                micro_batch_size: micro,
                ..layout.clone()
            },
        ));
        micro /= 2;
    }
    for (change, l) in &tries {
        if fits(l, hw) {
            return change.clone();
        }
    }
    if let Some(best) = meshes.iter().find(|e| e.fits) {
        return format!(
            "the mesh {} (the fastest that fits)",
            describe(&best.layout)
        );
    }
    // More devices: the smallest count (up to 64 times as many) at which some mesh fits.
    let mut smallest: Option<(Hardware, Layout, Memory)> = None;
    for k in 2..=64 {
        let more = Hardware {
            devices: hw.devices * k,
            ..hw.clone()
        };
        let probe = Layout {
            dp: more.devices / layout.tp.max(1),
            zero1: false,
            fsdp: true,
            activation_checkpointing: "block".into(),
            micro_batch_size: 1,
            ..layout.clone()
        };
        for tp in [layout.tp, 2, 4, 8] {
            let l = Layout {
                tp,
                dp: (more.devices / tp).max(1),
                ..probe.clone()
            };
            if !(more.devices.is_multiple_of(tp) && valid(shape, &l)) {
                continue;
            }
            let e = estimate(shape, &l, &more);
            if e.fits {
                return format!(
                    "{} devices with {} (no mesh of {} fits)",
                    more.devices,
                    describe(&l),
                    hw.devices
                );
            }
            if smallest
                .as_ref()
                .is_none_or(|(_, _, m)| e.memory.total < m.total)
            {
                smallest = Some((more.clone(), l, e.memory));
            }
        }
    }
    let Some((more, l, m)) = smallest else {
        return "nothing Kiln runs today: no mesh of up to 64 times as many devices is valid \
                for this model and batch"
            .into();
    };
    let (term, bytes) = m.largest();
    format!(
        "nothing Kiln runs today: up to 64 times as many devices, fully sharded and \
         recomputing every block, the smallest rank ({} on {} devices) still needs {}, the \
         most of it {} ({})",
        describe(&l),
        more.devices,
        gib(m.total),
        term,
        gib(bytes)
    )
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

/// `dp 4 x tp 2, ZeRO-1, recompute block, micro-batch 2`.
pub fn describe(l: &Layout) -> String {
    let mut s = format!("dp {} x tp {}", l.dp, l.tp);
    if l.zero1 {
        s.push_str(", ZeRO-1");
    }
    if l.fsdp {
        s.push_str(", fully sharded");
    }
    if l.activation_checkpointing != "none" {
        let _ = write!(s, ", recompute {}", l.activation_checkpointing);
    }
    let _ = write!(s, ", micro-batch {}", l.micro_batch_size);
    s
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / GIB)
}

impl Plan {
    /// The plan as text: the job's layout broken down, then the meshes.
    pub fn render(&self) -> String {
        let e = &self.estimate;
        let m = &e.memory;
        let h = &self.hardware;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {:.2}B parameters, seq {} x batch {}, {} on {} {} device(s) of {}, peak {} TFLOP/s at {:.0}% MFU, links {} Gbit/s",
            self.job,
            self.params as f64 / 1e9,
            self.seq_len,
            self.batch_size,
            if self.bf16 { "bf16" } else { "fp32" },
            h.devices,
            h.device,
            gib(h.memory_bytes),
            h.peak_tflops,
            h.mfu * 100.0,
            h.link_gbps,
        );
        let _ = writeln!(out, "\nper rank at {}:", describe(&e.layout));
        let rows = [
            ("parameters (fp32)", m.parameters),
            ("gradients (fp32)", m.gradients),
            ("optimizer state (AdamW)", m.optimizer_state),
            ("optimizer scratch", m.optimizer_scratch),
            ("bf16 weight copies", m.low_precision_weights),
            ("activations, one micro-batch", m.activations),
            ("backward working set", m.backward_working_set),
            ("loss (output head)", m.loss),
            ("runtime", m.runtime),
        ];
        let last = if h.device == "cuda" {
            "final weights (host memory)"
        } else {
            "final weights (after training)"
        };
        for (name, bytes) in rows {
            let _ = writeln!(out, "  {name:<30} {:>12}", gib(bytes));
        }
        let _ = writeln!(out, "  {last:<30} {:>12}", gib(m.final_weights));
        let _ = writeln!(
            out,
            "  {:<30} {:>12}",
            "total (the larger phase)",
            gib(m.total)
        );
        let _ = writeln!(
            out,
            "  (activations without recomputation: {}; FLOPs per token {:.3e}, run {:.3e})",
            gib(m.activations_without_recompute),
            e.flops_per_token,
            e.executed_flops_per_token
        );
        let _ = writeln!(
            out,
            "  step {:.3} s (compute {:.3}, tensor-parallel {:.3}, data-parallel exposed {:.3}), {:.0} tokens/s, {}",
            e.step_s,
            e.compute_s,
            e.tp_comm_s,
            e.dp_comm_s,
            e.tokens_per_s,
            if e.fits { "fits" } else { "DOES NOT FIT" },
        );
        let _ = writeln!(out, "\nmeshes of {} devices:", h.devices);
        let _ = writeln!(
            out,
            "  {:<54} {:>12} {:>10} {:>12}  fits",
            "layout", "memory", "step s", "tokens/s"
        );
        for e in &self.meshes {
            let _ = writeln!(
                out,
                "  {:<54} {:>12} {:>10.3} {:>12.0}  {}",
                describe(&e.layout),
                gib(e.memory.total),
                e.step_s,
                e.tokens_per_s,
                if e.fits { "yes" } else { "no" }
            );
        }
        if let Some(s) = &self.suggestion {
            let _ = writeln!(
                out,
                "\nthe job's layout does not fit; the smallest change that does: {s}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(preset: &str, seq: i64, batch: i64, bf16: bool) -> Shape {
        Shape {
            model: LlamaConfig::preset(preset).unwrap(),
            seq_len: seq,
            batch_size: batch,
            bf16,
            bucket_mb: 25.0,
        }
    }

    fn h100(n: usize) -> Hardware {
        Hardware {
            device: "cuda".into(),
            devices: n,
            memory_bytes: 80.0 * GIB,
            peak_tflops: 989.0,
            mfu: 0.4,
            link_gbps: 3600.0,
        }
    }

    fn layout(dp: usize, tp: usize, zero1: bool, ac: &str, micro: i64) -> Layout {
        Layout {
            dp,
            tp,
            zero1,
            fsdp: false,
            activation_checkpointing: ac.into(),
            micro_batch_size: micro,
        }
    }

    #[test]
    fn the_static_state_is_twenty_bytes_a_parameter_and_zero1_divides_the_optimizer() {
        let s = shape("125m", 256, 8, false);
        let cpu = Hardware {
            device: "cpu".into(),
            memory_bytes: 64.0 * GIB,
            ..h100(2)
        };
        let plain = estimate(&s, &layout(2, 1, false, "none", 4), &cpu).memory;
        let p = s.model.num_params() as f64;
        assert_eq!(plain.parameters, 4.0 * p);
        assert_eq!(plain.optimizer_state, 8.0 * p);
        assert_eq!(plain.optimizer_scratch, 4.0 * p);
        let z = estimate(&s, &layout(2, 1, true, "none", 4), &cpu).memory;
        // Each rank owns half of every bucket (rounded up).
        assert!((z.optimizer_state - 4.0 * p).abs() < 8.0 * 16.0, "{z:?}");
        assert!(z.optimizer_scratch < plain.optimizer_scratch / 2.0);
        assert_eq!(z.activations, plain.activations);
    }

    #[test]
    fn recomputation_keeps_less_and_runs_more() {
        let s = shape("8b", 8192, 64, true);
        let e = |ac| estimate(&s, &layout(8, 1, true, ac, 1), &h100(8));
        let (none, mlp, block) = (e("none"), e("mlp"), e("block"));
        assert!(none.memory.activations > mlp.memory.activations);
        assert!(mlp.memory.activations > block.memory.activations);
        assert_eq!(
            none.memory.activations_without_recompute,
            block.memory.activations_without_recompute
        );
        assert!(block.executed_flops_per_token > mlp.executed_flops_per_token);
        assert!(mlp.executed_flops_per_token > none.executed_flops_per_token);
        assert_eq!(none.executed_flops_per_token, none.flops_per_token);
        assert!(block.step_s > none.step_s);
    }

    #[test]
    fn the_large_presets_fit_where_the_arithmetic_says() {
        // 8b at 16 bytes a parameter plus scratch needs tensor parallelism on 8 x 80 GB.
        let s = shape("8b", 8192, 64, true);
        let job = JobConfig::parse(
            "name = \"p\"\n[model]\npreset = \"8b\"\n[data]\npath = \"d\"\n[train]\nseq_len = 8192\nbatch_size = 64\nmicro_batch_size = 1\nsteps = 1\n[output]\ndir = \"o\"\n",
            std::path::Path::new("p.toml"),
        )
        .unwrap();
        let p = plan(&job, s.clone(), layout(8, 1, false, "none", 1), h100(8));
        assert!(!p.estimate.fits);
        assert!(
            p.meshes.iter().any(|e| e.fits && e.layout.tp > 1),
            "{}",
            p.render()
        );
        assert!(p.suggestion.is_some());
        // 405b fits on no mesh of 8, nor of 512: its state alone is 20 bytes a parameter
        // over at most 8 tensor-parallel ranks.
        let s = shape("405b", 8192, 512, true);
        let p = plan(&job, s, layout(8, 8, true, "block", 1), h100(8));
        assert!(p.meshes.iter().all(|e| !e.fits));
        let why = p.suggestion.unwrap();
        assert!(why.contains("nothing Kiln runs today"), "{why}");
        // Fully sharded and recomputing, what is left is the block inputs it keeps.
        assert!(why.contains("the most of it activations"), "{why}");
        // 70b does fit on 64: fully sharded with block recomputation.
        let s = shape("70b", 8192, 128, true);
        let p = plan(&job, s, layout(8, 8, true, "block", 1), h100(64));
        let best = p
            .meshes
            .iter()
            .find(|e| e.fits)
            .expect("a mesh of 64 fits 70b");
        assert!(best.layout.fsdp, "{}", p.render());
    }

    #[test]
    fn full_sharding_divides_the_state_and_holds_what_is_gathered() {
        let s = shape("8b", 8192, 64, true);
        let fsdp = |ac: &str| Layout {
            zero1: false,
            fsdp: true,
            ..layout(8, 1, false, ac, 1)
        };
        let p = s.model.num_params() as f64;
        let none = estimate(&s, &fsdp("none"), &h100(8));
        let block = estimate(&s, &fsdp("block"), &h100(8));
        let zero1 = estimate(&s, &layout(8, 1, true, "block", 1), &h100(8));
        // AdamW's state is an eighth of 8 bytes a parameter, as with ZeRO-1.
        assert!((block.memory.optimizer_state - p).abs() / p < 0.01);
        assert!((block.memory.optimizer_state - zero1.memory.optimizer_state).abs() / p < 0.01);
        // Without recomputation autograd holds every block's gathered weights: the whole
        // model's 4 bytes a parameter, and the shard.
        assert!(none.memory.parameters > 4.0 * p);
        // With it: the shard, the embedding, the head and two blocks (for 8b's 128k
        // vocabulary, the embedding and the head are 13% of the model).
        assert!(
            block.memory.parameters < none.memory.parameters / 3.0,
            "{:?}",
            block.memory
        );
        // Gradients: the shard and at most a few whole segments, far below ZeRO-1's whole.
        assert!(block.memory.gradients < zero1.memory.gradients / 4.0);
        // 8b fits on 8 GPUs fully sharded, without tensor parallelism.
        assert!(block.fits, "{:?}", block.memory);
        assert!(!zero1.fits);
        // Gathering again for the recomputed backward costs traffic, not compute.
        assert!(block.dp_comm_s >= none.dp_comm_s);
    }
}
