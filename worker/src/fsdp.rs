//! Fully sharded data parallelism (ZeRO stage 3, as PyTorch's FSDP): each data-parallel rank
//! keeps only its chunk of every segment of the flat parameter buffer (an embedding, a block,
//! the head), and of its gradient and AdamW state.
//!
//! A segment's whole parameters exist only while it is gathered: from before its forward pass
//! ([`Sharding::gather`], the next segment prefetched while this one computes) to right after
//! it, and again, gathered anew, for its backward pass. When the block's activations are
//! recomputed (`activation_checkpointing = "block"`) nothing holds them in between and they
//! are dropped ([`Sharding::release`]). Without recomputation autograd's saved tensors hold
//! views of them, so dropping frees nothing: [`Sharding::reshard`] empties the buffer's
//! storage under those views ([`crate::storage`]) and the gather before the backward pass
//! fills it again, with the values autograd saved (FSDP's `reshard_after_forward`). Either
//! way one or two blocks' weights are whole at a time. With `reshard_after_forward = false`
//! a block's gathered weights stay from its forward to its backward pass.
//!
//! A segment's gradient is written whole as its backward runs, then averaged over the group
//! by a reduce-scatter the moment the segment is complete, each rank adding its chunk into
//! its shard of the gradient; the whole gradient is freed then. With gradient accumulation
//! every micro-batch reduce-scatters (the sum of the averages is the average of the sums).
//!
//! With hybrid sharding (HSDP, `parallel.shard`) the store is split over a shard group of
//! neighbouring data-parallel ranks and replicated across the groups: gathers and
//! reduce-scatters stay inside the shard group, and each reduced chunk is then averaged over
//! the replica group, the ranks holding the same chunk, before it lands in the shard
//! gradient. Every replica's chunk, and so its AdamW update, is then the same.
//!
//! Gathers and reduce-scatters run in order on one background thread per rank, so they
//! overlap the compute and every rank issues them in the same order. Parameters are gathered
//! in fp32 (with bf16 autocast, the cast to bf16 happens after the gather, as it does
//! unsharded, so the numbers are the same) and gradients are reduced in fp32.

use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::collective::{chunk_range, Collective, CollectiveError, ReduceOp};
use crate::params::ParamEntry;

/// The groups a fully sharded store communicates over, and when it frees what it gathered.
#[derive(Debug, Clone)]
pub struct Groups {
    /// The ranks that split the store between them: segments are gathered from and
    /// reduce-scattered over these.
    pub shard: Arc<dyn Collective>,
    /// The ranks holding the same chunks (hybrid sharding): each reduced chunk is averaged
    /// over them. A group of one without hybrid sharding.
    pub replica: Arc<dyn Collective>,
    /// Free a block's gathered parameters after its forward pass even when autograd keeps
    /// them for the backward pass (their storage is emptied under the saved views and
    /// gathered again before the block's backward).
    pub reshard_after_forward: bool,
}

/// This rank's part of a fully sharded parameter store.
#[derive(Debug)]
pub struct Sharding {
    /// The shard group.
    pub group: Arc<dyn Collective>,
    pub replica: Arc<dyn Collective>,
    pub reshard_after_forward: bool,
    /// Per segment, this rank's chunk of it, in flat coordinates.
    pub chunks: Vec<Range<i64>>,
    /// Per segment, where that chunk starts in the shard buffers.
    pub at: Vec<i64>,
    segments: Vec<Range<i64>>,
    device: Device,
    live: Mutex<Live>,
    comm: Mutex<Comm>,
}

/// What is whole right now.
#[derive(Debug, Default)]
struct Live {
    params: Vec<Option<Gathered>>,
    /// Per parameter: its view of the gathered segment, and that segment.
    views: Vec<Option<Tensor>>,
    view_segment: Vec<usize>,
    /// Per segment: its whole gradient, while backward writes it.
    grads: Vec<Option<Tensor>>,
}

#[derive(Debug)]
enum Gathered {
    /// Sent to the background thread; the receiver says when the buffer is whole. `true`
    /// when it is a refill of a [`Gathered::Freed`] buffer, whose views exist already.
    Pending(Tensor, mpsc::Receiver<Result<(), CollectiveError>>, bool),
    /// Whole: its parameters' views are in [`Live::views`].
    Ready(Tensor),
    /// Resharded after the forward pass: the buffer's memory is freed, its views (which
    /// autograd saved) kept for the refill before the backward pass.
    Freed(Tensor),
}

enum Job {
    Gather(Tensor, mpsc::Sender<Result<(), CollectiveError>>),
    /// A whole segment gradient, the shard chunk it reduces into, and whether it replaces it.
    Reduce(Tensor, Tensor, bool),
}

#[derive(Debug)]
struct Comm {
    jobs: Option<mpsc::Sender<Job>>,
    reduced: mpsc::Receiver<Result<f64, CollectiveError>>,
    in_flight: usize,
    handle: Option<JoinHandle<()>>,
}

impl Sharding {
    /// The layout of `segments` (flat ranges, in order) sharded over `groups.shard`.
    pub fn new(groups: Groups, segments: &[Range<i64>], device: Device) -> Self {
        let Groups {
            shard: group,
            replica,
            reshard_after_forward,
        } = groups;
        let (n, r) = (group.size(), group.rank());
        let mut chunks = Vec::with_capacity(segments.len());
        let mut at = Vec::with_capacity(segments.len());
        let mut offset = 0i64;
        for seg in segments {
            let c = chunk_range((seg.end - seg.start) as usize, n, r);
            chunks.push(seg.start + c.start as i64..seg.start + c.end as i64);
            at.push(offset);
            offset += c.len() as i64;
        }
        let comm = Comm::start(group.clone(), replica.clone());
        Sharding {
            group,
            replica,
            reshard_after_forward,
            chunks,
            at,
            segments: segments.to_vec(),
            device,
            live: Mutex::new(Live::default()),
            comm: Mutex::new(comm),
        }
    }

    /// The elements this rank holds.
    pub fn shard_numel(&self) -> i64 {
        self.chunks.iter().map(|c| c.end - c.start).sum()
    }

    /// The place of flat coordinate `x` in the shard buffers.
    pub fn locate(&self, x: i64) -> i64 {
        let s = self.segments.partition_point(|r| r.end <= x);
        let c = &self.chunks[s];
        assert!(
            c.contains(&x) || (x == c.end && c.start == c.end),
            "flat offset {x} is not in this rank's shard"
        );
        self.at[s] + (x - c.start)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.params.is_empty() {
            live.params = (0..self.segments.len()).map(|_| None).collect();
            live.grads = (0..self.segments.len()).map(|_| None).collect();
        }
        live
    }

    /// Starts gathering segment `s` unless it is gathered or on its way (again into its
    /// buffer when it was resharded after the forward pass).
    pub fn prefetch(&self, s: usize, flat: &Tensor) {
        if s >= self.segments.len() {
            return;
        }
        let mut live = self.live();
        let (buf, refill) = match live.params[s].take() {
            None => {
                let len = self.segments[s].end - self.segments[s].start;
                (Tensor::zeros([len], (Kind::Float, self.device)), false)
            }
            Some(Gathered::Freed(buf)) => {
                crate::storage::refill(&buf);
                (buf, true)
            }
            other => {
                live.params[s] = other;
                return;
            }
        };
        let (seg, c) = (&self.segments[s], &self.chunks[s]);
        // Written through an untracked handle: to autograd, the views it saved are unchanged.
        let fill = crate::storage::untracked(&buf);
        tch::no_grad(|| {
            fill.narrow(0, c.start - seg.start, c.end - c.start)
                .copy_(&flat.narrow(0, self.at[s], c.end - c.start))
        });
        let (tx, rx) = mpsc::channel();
        self.comm().send(Job::Gather(fill, tx));
        live.params[s] = Some(Gathered::Pending(buf, rx, refill));
    }

    /// Makes segment `s` whole (waiting for a prefetch in flight) and its parameters' views
    /// available.
    pub fn gather(
        &self,
        s: usize,
        flat: &Tensor,
        entries: &[ParamEntry],
    ) -> Result<(), CollectiveError> {
        self.prefetch(s, flat);
        let mut live = self.live();
        let (buf, rx, refill) = match live.params[s].take() {
            Some(Gathered::Pending(buf, rx, refill)) => (buf, rx, refill),
            other => {
                live.params[s] = other;
                return Ok(());
            }
        };
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(self.comm().failure()),
        }
        if refill {
            live.params[s] = Some(Gathered::Ready(buf));
            return Ok(());
        }
        if live.views.len() < entries.len() {
            live.views.resize_with(entries.len(), || None);
            live.view_segment = entries.iter().map(|e| e.spec.segment).collect();
        }
        let start = self.segments[s].start;
        for (i, e) in entries.iter().enumerate() {
            if e.spec.segment == s {
                let view = buf
                    .narrow(0, e.offset - start, e.numel)
                    .view(e.spec.shape.as_slice())
                    .set_requires_grad(true);
                live.views[i] = Some(view);
            }
        }
        live.params[s] = Some(Gathered::Ready(buf));
        Ok(())
    }

    /// After segment `s`'s forward pass, with `reshard_after_forward`: frees its gathered
    /// parameters' memory, keeping the views autograd saved; [`Sharding::gather`] fills
    /// them again for the backward pass.
    pub fn reshard(&self, s: usize) {
        if !self.reshard_after_forward {
            return;
        }
        let mut live = self.live();
        if let Some(Gathered::Ready(buf)) = live.params[s].take() {
            crate::storage::free(&buf);
            live.params[s] = Some(Gathered::Freed(buf));
        }
    }

    /// Parameter `i` (named `name`) of a gathered segment.
    pub fn view(&self, i: usize, name: &str) -> Tensor {
        let live = self.live();
        match live.views.get(i) {
            Some(Some(v)) => v.shallow_clone(),
            _ => panic!("parameter {name} is used while its segment is not gathered"),
        }
    }

    /// Drops segment `s`'s gathered buffer and views.
    pub fn release(&self, s: usize) {
        let mut live = self.live();
        if live.params[s].take().is_none() {
            return;
        }
        let Live {
            views,
            view_segment,
            ..
        } = &mut *live;
        for (v, seg) in views.iter_mut().zip(view_segment.iter()) {
            if *seg == s {
                *v = None;
            }
        }
    }

    /// Adds `g` into segment `s`'s whole gradient at offset `at` within the segment.
    pub fn add_grad(&self, s: usize, at: i64, g: &Tensor, overwrite: bool) {
        let mut live = self.live();
        let len = self.segments[s].end - self.segments[s].start;
        let device = self.device;
        let buf = live.grads[s].get_or_insert_with(|| Tensor::zeros([len], (Kind::Float, device)));
        let g = g.reshape([-1]).to_kind(Kind::Float);
        tch::no_grad(|| {
            let mut slot = buf.narrow(0, at, g.numel() as i64);
            if overwrite {
                slot.copy_(&g);
            } else {
                let _ = slot.g_add_(&g);
            }
        });
    }

    /// Hands segment `s`'s whole gradient to the background thread, to be averaged and
    /// written into this rank's chunk of `grad` (the shard gradient).
    pub fn reduce(&self, s: usize, grad: &Tensor, overwrite: bool) {
        let len = self.segments[s].end - self.segments[s].start;
        let whole = self.live().grads[s]
            .take()
            .unwrap_or_else(|| Tensor::zeros([len], (Kind::Float, self.device)));
        let c = &self.chunks[s];
        let into = grad.narrow(0, self.at[s], c.end - c.start);
        let mut comm = self.comm();
        comm.send(Job::Reduce(whole, into, overwrite));
        comm.in_flight += 1;
    }

    /// Waits for every reduce-scatter handed over so far.
    pub fn wait_reduced(&self) -> Result<f64, CollectiveError> {
        self.comm().wait()
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Comm> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Comm {
    fn start(group: Arc<dyn Collective>, replica: Arc<dyn Collective>) -> Comm {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (done_tx, reduced) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("kiln-fsdp".into())
            .spawn(move || {
                let (n, r) = (group.size(), group.rank());
                for job in rx {
                    match job {
                        Job::Gather(buf, done) => {
                            let result = group.all_gather_flat(&buf);
                            let failed = result.is_err();
                            let _ = done.send(result);
                            if failed {
                                break;
                            }
                        }
                        Job::Reduce(whole, into, overwrite) => {
                            let start = Instant::now();
                            let c = chunk_range(whole.numel(), n, r);
                            let mine = whole.narrow(0, c.start as i64, c.len() as i64);
                            let mut result = group.reduce_scatter_flat(&whole, ReduceOp::Avg);
                            if result.is_ok() && replica.size() > 1 {
                                result = replica.all_reduce(&mine, ReduceOp::Avg);
                            }
                            if result.is_ok() {
                                let mut into = into;
                                tch::no_grad(|| {
                                    if overwrite {
                                        into.copy_(&mine);
                                    } else {
                                        let _ = into.g_add_(&mine);
                                    }
                                });
                            }
                            let failed = result.is_err();
                            let _ = done_tx.send(result.map(|()| start.elapsed().as_secs_f64()));
                            if failed {
                                break;
                            }
                        }
                    }
                }
            })
            .ok();
        Comm {
            jobs: Some(jobs),
            reduced,
            in_flight: 0,
            handle,
        }
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // A stopped thread is reported by whoever waits for the job.
            let _ = jobs.send(job);
        }
    }

    /// Waits for the reduce-scatters in flight; the first failure among them.
    fn wait(&mut self) -> Result<f64, CollectiveError> {
        let mut busy = 0.0;
        let mut first = None;
        while self.in_flight > 0 {
            self.in_flight -= 1;
            match self.reduced.recv() {
                Ok(Ok(s)) => busy += s,
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    self.in_flight = 0;
                    first.get_or_insert_with(stopped);
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(busy),
        }
    }

    /// Why the background thread stopped: the failure of a reduce-scatter it ran, if one
    /// did (a gather's own failure goes to the gather's waiter).
    fn failure(&mut self) -> CollectiveError {
        match self.wait() {
            Err(e) => e,
            Ok(_) => stopped(),
        }
    }
}

fn stopped() -> CollectiveError {
    CollectiveError::Invalid("the parameter communication thread stopped".into())
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
