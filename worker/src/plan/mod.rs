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
//!   embedding's from the head's backward on); with hybrid sharding the chunks are of the
//!   shard group's size, not the data-parallel group's;
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
//! at `peak * mfu`, traffic is bytes over `link_gbps` with ring all-reduce costs. Fully
//! sharded, every micro-batch gathers and reduce-scatters over the shard group and, with
//! hybrid sharding, all-reduces its chunk over the replicas (one link speed for both: the
//! plan does not model a faster link inside a node). The mesh search leaves hybrid sharding
//! out; a job that sets it is planned as written.

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::LlamaConfig;
use kiln_proto::job::JobConfig;

mod memory;
mod render;
mod timing;

pub use memory::estimate;
use render::gib;

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
    /// Hybrid sharding: fully sharded within groups of this many data-parallel ranks,
    /// replicated across them (0: one group of all of them).
    pub shard: usize,
    /// Fully sharded: blocks freed after their forward pass and gathered again for their
    /// backward.
    pub reshard_after_forward: bool,
    /// `none`, `mlp` or `block`.
    pub activation_checkpointing: String,
    pub micro_batch_size: i64,
}

impl Layout {
    /// The data-parallel ranks a fully sharded store is split over.
    pub fn shard_group(&self) -> usize {
        if self.shard > 0 && self.shard < self.dp {
            self.shard
        } else {
            self.dp
        }
    }
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

/// Whether `layout` is one Kiln can run for `shape`: tensor parallelism dividing the heads
/// and the MLP, the batch split evenly into micro-batches.
fn valid(shape: &Shape, l: &Layout) -> bool {
    shape.model.check_tensor_parallel(l.tp).is_ok()
        && (l.shard == 0 || (l.fsdp && l.dp.is_multiple_of(l.shard)))
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
                    shard: 0,
                    reshard_after_forward: true,
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

/// `dp 4 x tp 2, ZeRO-1, recompute block, micro-batch 2`.
pub fn describe(l: &Layout) -> String {
    let mut s = format!("dp {} x tp {}", l.dp, l.tp);
    if l.zero1 {
        s.push_str(", ZeRO-1");
    }
    if l.fsdp && l.shard_group() < l.dp {
        let _ = write!(s, ", fully sharded in groups of {}", l.shard_group());
    } else if l.fsdp {
        s.push_str(", fully sharded");
    }
    if l.fsdp && !l.reshard_after_forward {
        s.push_str(" (blocks kept from forward to backward)");
    }
    if l.activation_checkpointing != "none" {
        let _ = write!(s, ", recompute {}", l.activation_checkpointing);
    }
    let _ = write!(s, ", micro-batch {}", l.micro_batch_size);
    s
}

#[cfg(test)]
mod tests;
