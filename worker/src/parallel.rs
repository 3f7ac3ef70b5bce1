//! Data parallelism over the flat gradient buffer, and one optimizer step on a `dp x tp` mesh.
//!
//! The gradient buffer is cut into buckets of whole segments (an embedding, blocks, the head)
//! of about `bucket_mb` MiB. Backward runs piece by piece from the head ([`Llama::backward`]),
//! so a segment's gradients are complete when its pieces return; the moment the last segment
//! of a bucket is complete, the bucket goes to a communication thread that averages it over
//! the data-parallel group while the blocks before it are still in backward. With gradient
//! accumulation only the last micro-batch communicates.
//!
//! With ZeRO-1 a bucket is reduce-scattered instead: data-parallel rank `r` receives the
//! average of chunk `r` of each bucket ([`crate::collective::chunk_range`]), keeps AdamW
//! state for those chunks only, updates them, and all-gathers the parameters. Without ZeRO-1
//! a bucket is all-reduced, which is the same reduce-scatter followed by an all-gather, so
//! both modes see bitwise the same averaged gradients; the gradient norm is computed from the
//! same chunks in both, so the runs stay identical.
//!
//! # Streams
//!
//! On a GPU every libtorch kernel runs on the compute stream (the legacy default stream) and
//! NCCL on a stream of its own. When a bucket's last segment is complete, the training thread
//! records a marker on the compute stream ([`crate::collective::Collective::ready_marker`])
//! and hands it to the communication thread with the bucket; the NCCL stream waits on that
//! marker, so the bucket's all-reduce (or reduce-scatter) starts as soon as its gradients are
//! written, while the compute stream goes on with backward. The compute stream waits for the
//! collectives only in [`DataParallel::finish`], before the gradient norm and the optimizer
//! read the averaged gradients. On the CPU (the TCP backend) the collectives are synchronous
//! and the markers are absent.
//!
//! # Step accounting
//!
//! Kernels run asynchronously: a host clock around enqueued work measures the enqueueing, not
//! the work (backward would be paid for in the optimizer's first read). [`train_step`]
//! therefore waits for the compute stream at each phase boundary ([`crate::cuda::sync_compute`],
//! nothing on the CPU), so each phase's seconds are its own: forward, backward, the wait for
//! the collectives, the checkpoint fence, the optimizer. The loss is summed on the device and
//! the gradient norm's squares are summed there too, in the order the host used to (so runs
//! stay bitwise the same); each is read on the host once per step.

use std::ops::Range;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::collective::{chunk_range, CollectiveError, ProcessGroups, ReadyMarker, ReduceOp};
use crate::model::Llama;
use crate::optim::AdamW;
use crate::params::ParamStore;

/// A contiguous range of the flat buffer, reduced as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub range: Range<i64>,
    /// Segments `segments.start..segments.end` of the parameter store.
    pub segments: Range<usize>,
}

/// Groups consecutive segments (given as flat ranges, in order) into buckets of at least
/// `bucket_bytes` (the first bucket may be smaller), filled from the last segment backwards:
/// the order backward completes them.
pub fn plan_buckets(segments: &[Range<i64>], bucket_bytes: u64) -> Vec<Bucket> {
    let mut buckets = Vec::new();
    let mut end = segments.len();
    while end > 0 {
        let mut start = end;
        let mut bytes = 0u64;
        while start > 0 && (bytes < bucket_bytes || start == end) {
            start -= 1;
            bytes += 4 * (segments[start].end - segments[start].start) as u64;
        }
        buckets.push(Bucket {
            range: segments[start].start..segments[end - 1].end,
            segments: start..end,
        });
        end = start;
    }
    buckets.reverse();
    buckets
}

/// A bucket for the communication thread, with the compute-stream point after which its
/// gradients are complete (none on the CPU).
enum Job {
    AllReduce(Tensor, Option<ReadyMarker>),
    ReduceScatter(Tensor, Option<ReadyMarker>),
}

/// This rank's data-parallel state.
#[derive(Debug)]
pub struct DataParallel {
    pub groups: ProcessGroups,
    pub buckets: Vec<Bucket>,
    zero1: bool,
    /// Fully sharded ([`crate::fsdp`]): per segment, this rank's chunk in flat coordinates
    /// and where it lies in the shard buffers. The store reduces the gradients itself.
    shards: Option<(Vec<Range<i64>>, Vec<i64>)>,
    /// `trigger[s]`: the bucket that is complete once segment `s` is.
    trigger: Vec<Option<usize>>,
    comm: Option<CommThread>,
    /// With tensor parallelism, on ranks other than the first of their group: 0 over the
    /// parameters every tensor-parallel rank holds whole (norms), 1 elsewhere, so the
    /// gradient norm counts them once.
    norm_mask: Option<Tensor>,
    /// A failure to mark a bucket ready, reported by [`DataParallel::finish`].
    failed: Option<CollectiveError>,
}

#[derive(Debug)]
struct CommThread {
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Result<f64, CollectiveError>>,
    in_flight: usize,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Job::AllReduce(..) => "AllReduce",
            Job::ReduceScatter(..) => "ReduceScatter",
        })
    }
}

impl DataParallel {
    pub fn new(model: &Llama, groups: ProcessGroups, bucket_mb: f64, zero1: bool) -> Self {
        let segments: Vec<Range<i64>> = model
            .params
            .segments()
            .iter()
            .map(|s| s.range.clone())
            .collect();
        let buckets = plan_buckets(&segments, (bucket_mb * (1u64 << 20) as f64) as u64);
        let mut trigger = vec![None; segments.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            trigger[bucket.segments.start] = Some(b);
        }
        let shards = model
            .params
            .sharding()
            .map(|sh| (sh.chunks.clone(), sh.at.clone()));
        let comm = (groups.dp.size() > 1 && shards.is_none()).then(|| {
            let dp = groups.dp.clone();
            let (jobs, rx) = mpsc::channel::<Job>();
            let (done_tx, done) = mpsc::channel();
            let handle = std::thread::Builder::new()
                .name("kiln-grad-sync".into())
                .spawn(move || {
                    for job in rx {
                        let start = Instant::now();
                        // Enqueued after the bucket's marker; the compute stream waits for it
                        // only in `finish`.
                        let r = match job {
                            Job::AllReduce(t, ready) => {
                                dp.all_reduce_after(&t, ReduceOp::Avg, ready)
                            }
                            Job::ReduceScatter(t, ready) => {
                                dp.reduce_scatter_flat_after(&t, ReduceOp::Avg, ready)
                            }
                        };
                        let failed = r.is_err();
                        let _ = done_tx.send(r.map(|()| start.elapsed().as_secs_f64()));
                        if failed {
                            break;
                        }
                    }
                })
                .ok();
            CommThread {
                jobs: Some(jobs),
                done,
                in_flight: 0,
                handle,
            }
        });
        let norm_mask = (groups.tp.size() > 1 && groups.tp.rank() != 0).then(|| {
            let params = &model.params;
            let mask = params.flat.ones_like();
            let held = |lo: i64, hi: i64| match params.sharding() {
                None => Some((lo, hi)),
                // Only what lies in this rank's chunk of the parameter's segment.
                Some(sh) => sh
                    .chunks
                    .iter()
                    .map(|c| (lo.max(c.start), hi.min(c.end)))
                    .find(|(a, b)| b > a)
                    .map(|(a, b)| (params.locate(a), params.locate(a) + (b - a))),
            };
            for e in params.entries() {
                if e.spec.shard.is_none() {
                    if let Some((a, b)) = held(e.offset, e.offset + e.numel) {
                        let _ = mask.narrow(0, a, b - a).fill_(0.0);
                    }
                }
            }
            mask
        });
        DataParallel {
            groups,
            buckets,
            zero1,
            shards,
            trigger,
            comm,
            norm_mask,
            failed: None,
        }
    }

    /// This rank's chunk of each bucket: what it owns with ZeRO-1, and what it sums the
    /// gradient norm over in both modes.
    pub fn owned_chunks(&self) -> Vec<Range<i64>> {
        let (n, r) = (self.groups.dp.size(), self.groups.dp.rank());
        self.buckets
            .iter()
            .map(|b| {
                let c = chunk_range((b.range.end - b.range.start) as usize, n, r);
                b.range.start + c.start as i64..b.range.start + c.end as i64
            })
            .collect()
    }

    /// The ranges of the flat buffer this rank's optimizer updates (flat coordinates).
    pub fn optimizer_ranges(&self, numel: i64) -> Vec<Range<i64>> {
        if let Some((chunks, _)) = &self.shards {
            chunks.clone()
        } else if self.zero1 && self.groups.dp.size() > 1 {
            self.owned_chunks()
        } else {
            std::iter::once(0..numel).collect()
        }
    }

    /// Segment `s` of `params`' gradient is final for micro-batch `first..=last` of a step:
    /// fully sharded, reduce it now; otherwise, on the last micro-batch, start reducing its
    /// bucket if that was the bucket's last segment. The bucket's readiness is marked here,
    /// on the compute stream, at the point backward has reached.
    pub fn segment_done(&mut self, s: usize, params: &ParamStore, first: bool, last: bool) {
        if self.shards.is_some() {
            params.reduce_segment(s, first);
            return;
        }
        if !last {
            return;
        }
        let grad = &params.grad;
        let (Some(comm), Some(Some(b))) = (self.comm.as_mut(), self.trigger.get(s)) else {
            return;
        };
        let ready = match self.groups.dp.ready_marker() {
            Ok(ready) => ready,
            Err(e) => {
                // The bucket is not sent: `finish` reports the failure.
                self.failed.get_or_insert(e);
                return;
            }
        };
        let range = &self.buckets[*b].range;
        let bucket = grad.narrow(0, range.start, range.end - range.start);
        let job = if self.zero1 {
            Job::ReduceScatter(bucket, ready)
        } else {
            Job::AllReduce(bucket, ready)
        };
        if let Some(jobs) = &comm.jobs {
            if jobs.send(job).is_ok() {
                comm.in_flight += 1;
            }
        }
    }

    /// Waits for the communication thread to have handed every bucket to the backend, and
    /// makes the compute stream wait for their collectives (on the device; the host does not
    /// block for them here). Returns the seconds the communication thread spent in
    /// collective calls (on a GPU: enqueueing them).
    pub fn finish(&mut self, params: &ParamStore) -> Result<f64, CollectiveError> {
        if self.shards.is_some() {
            return params.wait_reduced();
        }
        let Some(comm) = self.comm.as_mut() else {
            return Ok(0.0);
        };
        let mut busy = 0.0;
        let mut first_error = self.failed.take();
        while comm.in_flight > 0 {
            comm.in_flight -= 1;
            match comm.done.recv() {
                Ok(Ok(s)) => busy += s,
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(CollectiveError::Invalid(
                        "the gradient communication thread stopped".into(),
                    ));
                    break;
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                self.groups.dp.wait_pending()?;
                Ok(busy)
            }
        }
    }

    /// The global gradient norm over every rank's gradients (each parameter counted once).
    /// The squares of the chunks' norms are added on the gradients' device, in f64 and in
    /// chunk order, then reduced over the groups; the host reads the one result.
    pub fn grad_norm(&self, grad: &Tensor) -> Result<f64, CollectiveError> {
        // On the gradients' device: NCCL reduces device memory only.
        let mut total = Tensor::zeros([1], (Kind::Double, grad.device()));
        // Where this rank's chunks lie in `grad`.
        let chunks = match &self.shards {
            Some((chunks, at)) => chunks
                .iter()
                .zip(at)
                .map(|(c, &a)| a..a + (c.end - c.start))
                .collect(),
            None => self.owned_chunks(),
        };
        for r in chunks {
            let g = grad.narrow(0, r.start, r.end - r.start);
            let n = match &self.norm_mask {
                Some(mask) => (&g * mask.narrow(0, r.start, r.end - r.start)).norm(),
                None => g.norm(),
            }
            .to_kind(Kind::Double);
            total += &n * &n;
        }
        // Fully sharded, the shard group holds each element once (its replicas, with hybrid
        // sharding, the same chunks again).
        let holders = match &self.shards {
            Some(_) => &self.groups.shard,
            None => &self.groups.dp,
        };
        holders.all_reduce(&total, ReduceOp::Sum)?;
        self.groups.tp.all_reduce(&total, ReduceOp::Sum)?;
        Ok(total.double_value(&[0]).sqrt())
    }

    /// After the optimizer updated its chunks (ZeRO-1), every rank gets every chunk.
    pub fn gather_params(&self, flat: &Tensor) -> Result<(), CollectiveError> {
        if !(self.zero1 && self.groups.dp.size() > 1) {
            return Ok(());
        }
        for b in &self.buckets {
            let bucket = flat.narrow(0, b.range.start, b.range.end - b.range.start);
            self.groups.dp.all_gather_flat(&bucket)?;
        }
        Ok(())
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the step's micro-batches and the data-parallel ranks.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds in forward passes (the loss included), until the device finished them.
    pub forward_s: f64,
    /// Seconds in backward passes, gradient accumulation included, until the device finished
    /// them.
    pub backward_s: f64,
    /// Seconds waiting, after backward, for gradient communication still in flight.
    pub collective_wait_s: f64,
    /// Seconds the communication thread spent in collective calls (overlapped with
    /// backward; on a GPU, enqueueing them).
    pub collective_s: f64,
    /// Seconds in the gradient norm, clipping, the AdamW update, the ZeRO-1 gather and the
    /// loss's reduction, until the device finished them.
    pub optimizer_s: f64,
    /// Seconds `before_update` held the step (a checkpoint still reading the weights), until
    /// the device had passed its fence.
    pub held_s: f64,
}

/// One optimizer step over `batches` (micro-batches of `(inputs, targets)`, `[b, t]` each):
/// forward and backward each, gradients accumulated and all-reduced in buckets while backward
/// runs, then clipping and the AdamW update. `before_update` runs just before the parameters
/// change (a checkpoint still copying them waits there, on the host or on the device). Each
/// phase is a span (`forward`, `backward`, `collective`, `optimizer`) under the caller's step
/// span, and ends with the compute stream finished (see "Step accounting" above).
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &Llama,
    optimizer: &mut AdamW,
    dp: &mut DataParallel,
    batches: &[(Tensor, Tensor)],
    lr: f64,
    grad_clip: f64,
    bf16: bool,
    before_update: &mut dyn FnMut(),
) -> Result<StepStats, CollectiveError> {
    let device = model.device();
    // The end of a phase: the compute stream has finished what the phase enqueued.
    let sync = || crate::cuda::sync_compute(device);
    let (mut forward_s, mut backward_s) = (0.0, 0.0);
    // Summed on the device, in f64, in micro-batch order: read once, after the step.
    let mut loss_sum = Tensor::zeros([1], (Kind::Double, device));
    let scale = 1.0 / batches.len().max(1) as f64;
    for (i, (inputs, targets)) in batches.iter().enumerate() {
        let start = Instant::now();
        let tape = tracing::info_span!("forward", kiln.micro_batch = i as u64).in_scope(|| {
            crate::precision::autocast(bf16, device, || model.forward_tape(inputs, targets, scale))
        })?;
        loss_sum += &tape.loss * scale;
        sync();
        let forward_done = Instant::now();
        forward_s += (forward_done - start).as_secs_f64();
        let last = i + 1 == batches.len();
        tracing::info_span!("backward", kiln.micro_batch = i as u64).in_scope(|| {
            model.backward(tape, i == 0, &mut |s| {
                dp.segment_done(s, &model.params, i == 0, last)
            })
        })?;
        sync();
        backward_s += forward_done.elapsed().as_secs_f64();
    }
    let backward_done = Instant::now();
    let collective_s = tracing::info_span!("collective").in_scope(|| {
        // The compute stream now waits for the buckets' collectives: syncing it waits for them.
        let busy = dp.finish(&model.params);
        sync();
        busy
    })?;
    let synced = Instant::now();
    let span = tracing::info_span!("optimizer").entered();
    // Reads the norm on the host: the compute stream has finished the clipping's input.
    let grad_norm = dp.grad_norm(&model.params.grad)?;
    if grad_clip > 0.0 {
        let coef = (grad_clip / (grad_norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            let _ = model.params.grad.shallow_clone().g_mul_scalar_(coef);
        }
    }
    // The parameters and the optimizer state change from here on.
    sync();
    let held = Instant::now();
    before_update();
    // A fence on the device (a checkpoint copy on its own stream) holds the compute stream.
    sync();
    let held_s = held.elapsed().as_secs_f64();
    optimizer.step(&model.params, lr);
    dp.gather_params(&model.params.flat)?;
    dp.groups.dp.all_reduce(&loss_sum, ReduceOp::Avg)?;
    let loss = loss_sum.double_value(&[0]);
    sync();
    drop(span);
    Ok(StepStats {
        loss,
        grad_norm,
        forward_s,
        backward_s,
        collective_wait_s: (synced - backward_done).as_secs_f64(),
        collective_s,
        optimizer_s: synced.elapsed().as_secs_f64() - held_s,
        held_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fill_from_the_end_and_cover_everything() {
        // Segments of 10, 100, 100, 100, 5 floats; buckets of at least 800 bytes.
        let segs = [0..10, 10..110, 110..210, 210..310, 310..315];
        let b = plan_buckets(&segs, 800);
        assert_eq!(
            b,
            vec![
                Bucket {
                    range: 0..110,
                    segments: 0..2
                },
                Bucket {
                    range: 110..315,
                    segments: 2..5
                },
            ]
        );
        // Tiny buckets: one per segment.
        assert_eq!(plan_buckets(&segs, 1).len(), 5);
        // Huge buckets: one.
        assert_eq!(plan_buckets(&segs, 1 << 30).len(), 1);
    }
}
