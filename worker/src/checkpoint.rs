//! The training state as checkpoint pieces, saved synchronously or in the background, and
//! loaded back at any mesh.
//!
//! What a rank writes: of its (tensor-parallel) slice of the flat parameter buffer, the
//! ranges it owns among its data-parallel group (its ZeRO-1 ranges, or without ZeRO-1 an
//! even split), for the parameters and AdamW's `exp_avg` and `exp_avg_sq`. Each range is cut
//! at parameter boundaries into pieces named after the parameter (`optim.exp_avg/NAME` for
//! the state), each piece a box of the whole tensor (the tensor-parallel slice) and a flat
//! range within it. Together the ranks write every element once.
//!
//! Asynchronous saves copy the state into one host buffer per rank on a background thread
//! while the next step's forward and backward passes run; the optimizer update waits for
//! the copy ([`Saver::fence`]), then the upload, the confirmation and (on rank 0) the
//! commit continue in the background. At most one save is in flight.
//!
//! # Copying out of GPU memory
//!
//! Which elements of which flat tensor (parameters, `exp_avg`, `exp_avg_sq`) a save reads is
//! one plan ([`CopyPlan`]): the sources merged into contiguous runs per tensor, each with its
//! place in a packed copy. On the CPU the parts are filled straight from the tensors (a
//! memory copy, on the background thread). For CUDA tensors [`Saver::save`] instead
//!
//! 1. records an event on the compute stream (the point the state was saved at) and makes a
//!    non-blocking copy stream of the saver's wait on it;
//! 2. enqueues one device-to-host copy per run (a handful per tensor: one without ZeRO-1, one
//!    per bucket with it) into page-locked host buffers kept from one save to the next;
//! 3. records a second event on the copy stream after the copies.
//!
//! [`Saver::fence`] makes the compute stream wait on that second event, on the device: the
//! host does not block, and the optimizer's update, enqueued after the fence, cannot change
//! the state before it is copied. The background thread waits for the same event, then fills
//! the parts from the page-locked buffers. The page-locked copy holds this rank's share of
//! the state in host memory; when a host budget ([`Saver::with_host_budget`]) is smaller
//! than that, the save copies part by part as on the CPU.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_checkpoint::{
    CheckpointError, CheckpointManifest, CheckpointStore, Dtype, Mesh, RankObjectWriter, Region,
    Strays, TensorInfo,
};
use tch::{Device, Kind, Tensor};

use crate::collective::{chunk_range, host};
use crate::cuda::HostCopy;
use crate::model::Llama;
use crate::optim::AdamW;

mod copy;

use copy::{copy_out, CopyPlan, GpuCopy, Staged};

/// The names of the optimizer-state tensors of parameter `name`.
pub fn state_names(name: &str) -> [String; 2] {
    [
        format!("optim.exp_avg/{name}"),
        format!("optim.exp_avg_sq/{name}"),
    ]
}

/// How long rank 0 waits for every rank's confirmation before giving up a save:
/// `KILN_CHECKPOINT_COMMIT_TIMEOUT_S`, 600 s by default.
fn commit_timeout() -> Duration {
    let secs = std::env::var("KILN_CHECKPOINT_COMMIT_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(600.0);
    Duration::from_secs_f64(secs)
}

/// Where one piece's elements live on this rank.
#[derive(Debug, Clone)]
struct Source {
    region: Region,
    /// 0: parameters, 1: `exp_avg`, 2: `exp_avg_sq`.
    which: usize,
    /// Element offset in that flat tensor.
    at: i64,
}

/// The box of parameter `i` that this rank holds: offsets and extent per dimension.
fn param_box(model: &Llama, i: usize) -> (String, Vec<u64>, Vec<u64>, Vec<u64>) {
    let spec = &model.params.entries()[i].spec;
    let mut offsets = vec![0u64; spec.shape.len()];
    if let Some(shard) = spec.shard {
        offsets[shard.dim] = shard.start as u64;
    }
    let shape = spec.shape.iter().map(|&d| d as u64).collect();
    let full = spec.full_shape().iter().map(|&d| d as u64).collect();
    (spec.name.clone(), offsets, shape, full)
}

/// Every whole tensor of the state, with its shape.
pub fn tensor_infos(model: &Llama) -> BTreeMap<String, TensorInfo> {
    let mut out = BTreeMap::new();
    for i in 0..model.params.entries().len() {
        let (name, _, _, full) = param_box(model, i);
        let info = TensorInfo {
            dtype: Dtype::F32,
            shape: full,
        };
        for s in state_names(&name) {
            out.insert(s, info.clone());
        }
        out.insert(name, info);
    }
    out
}

/// The pieces `ranges` of the flat buffer (with `state_at[k]`, where range `k` starts in the
/// optimizer's state tensors) cut at parameter boundaries, for the parameters (`params`) and
/// the state (`state`).
/// `replicated`: whether to include parameters every tensor-parallel rank holds whole
/// (norms): only the first tensor-parallel rank writes them.
fn sources(
    model: &Llama,
    ranges: &[Range<i64>],
    state_at: &[i64],
    params: bool,
    state: bool,
    replicated: bool,
) -> Vec<Source> {
    let mut out = Vec::new();
    for (k, r) in ranges.iter().enumerate() {
        for (i, e) in model.params.entries().iter().enumerate() {
            let (lo, hi) = (r.start.max(e.offset), r.end.min(e.offset + e.numel));
            if lo >= hi || (!replicated && e.spec.shard.is_none()) {
                continue;
            }
            let (name, offsets, shape, _) = param_box(model, i);
            let flat = (lo - e.offset) as u64..(hi - e.offset) as u64;
            let region = |tensor: &str| Region {
                tensor: tensor.to_owned(),
                offsets: offsets.clone(),
                shape: shape.clone(),
                flat: flat.clone(),
            };
            if params {
                out.push(Source {
                    region: region(&name),
                    which: 0,
                    at: model.params.locate(lo),
                });
            }
            if state {
                for (w, s) in state_names(&name).iter().enumerate() {
                    out.push(Source {
                        region: region(s),
                        which: w + 1,
                        at: state_at[k] + (lo - r.start),
                    });
                }
            }
        }
    }
    out
}

/// Where each owned range starts in the optimizer's back-to-back state.
fn state_offsets(owned: &[Range<i64>]) -> Vec<i64> {
    owned
        .iter()
        .scan(0i64, |at, r| {
            let here = *at;
            *at += r.end - r.start;
            Some(here)
        })
        .collect()
}

/// What this rank writes: its share of the parameters and of the optimizer state.
fn owned_sources(
    model: &Llama,
    optimizer: &AdamW,
    mesh: &Mesh,
    dp_rank: usize,
    tp_rank: usize,
) -> Vec<Source> {
    let numel = model.params.numel();
    let replicated = tp_rank == 0;
    let owned = optimizer.owned();
    if owned.len() == 1 && owned[0] == (0..numel) {
        // Every data-parallel rank holds everything: each writes an even share.
        let c = chunk_range(numel as usize, mesh.dp, dp_rank);
        let mine: Vec<Range<i64>> = std::iter::once(c.start as i64..c.end as i64).collect();
        sources(model, &mine, &[mine[0].start], true, true, replicated)
    } else if mesh.shard > 0 && mesh.shard < mesh.dp {
        // Hybrid sharding: the replicas of a shard hold the same chunks; each writes an even
        // share of every one.
        let (replicas, replica) = (mesh.dp / mesh.shard, dp_rank / mesh.shard);
        let (mut mine, mut at) = (Vec::new(), Vec::new());
        for (r, a) in owned.iter().zip(state_offsets(owned)) {
            let c = chunk_range((r.end - r.start) as usize, replicas, replica);
            mine.push(r.start + c.start as i64..r.start + c.end as i64);
            at.push(a + c.start as i64);
        }
        sources(model, &mine, &at, true, true, replicated)
    } else {
        sources(model, owned, &state_offsets(owned), true, true, replicated)
    }
}

/// A save in the background: first the copy to host memory, then the upload.
struct InFlight {
    step: u64,
    copied: mpsc::Receiver<()>,
    /// For a GPU save: the end of the copy on the device, which the fence makes the compute
    /// stream wait for.
    device_copied: Option<Arc<HostCopy>>,
    done: JoinHandle<Result<Saved, CheckpointError>>,
}

/// A finished save.
#[derive(Debug, Clone)]
pub struct Saved {
    pub step: u64,
    /// Bytes this rank wrote.
    pub bytes: u64,
    /// Seconds from the start of the save to this rank's confirmation.
    pub upload_s: f64,
    /// Set on rank 0: the committed manifest's URL and the checkpoints retention deleted.
    pub committed: Option<String>,
    pub deleted: Vec<u64>,
}

/// The coordinator's part in a commit, when a coordinator runs the job: each rank reports
/// its object written (phase one), and rank 0 writes the manifest only once the coordinator
/// has seen every rank's report and said so (phase two). Without a gate, rank 0 commits
/// when every rank's confirmation object is in the store.
pub trait CommitGate: Send + Sync {
    /// This rank's object of `step` (and its confirmation) is written.
    fn written(&self, step: u64);
    /// Blocks until `step` may be committed; an error gives the save up.
    fn wait_commit(&self, step: u64, timeout: Duration) -> Result<(), String>;
}

/// Saves the training state of one rank every so often.
pub struct Saver {
    store: CheckpointStore,
    rank: usize,
    mesh: Mesh,
    dp_rank: usize,
    tp_rank: usize,
    asynchronous: bool,
    keep_last: usize,
    keep_every: u64,
    host_budget: Option<u64>,
    /// Part buffers kept from one save to the next.
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The copy stream and page-locked buffers of GPU saves, made at the first one.
    gpu: Option<GpuCopy>,
    in_flight: Option<InFlight>,
    gate: Option<Arc<dyn CommitGate>>,
}

/// Where a rank sits in the mesh and what its saves keep: how [`Saver::new`] is set up.
#[derive(Debug, Clone, Copy)]
pub struct SaverOptions {
    /// This rank's global rank (rank 0 commits and applies retention).
    pub rank: usize,
    pub mesh: Mesh,
    pub dp_rank: usize,
    pub tp_rank: usize,
    /// Uploads run in the background while training goes on.
    pub asynchronous: bool,
    /// Retention: keep the newest `keep_last` checkpoints, and every `keep_every`-th step
    /// (0: none).
    pub keep_last: usize,
    pub keep_every: u64,
}

impl Saver {
    pub fn new(store: CheckpointStore, options: SaverOptions) -> Self {
        let SaverOptions {
            rank,
            mesh,
            dp_rank,
            tp_rank,
            asynchronous,
            keep_last,
            keep_every,
        } = options;
        Saver {
            store,
            rank,
            mesh,
            dp_rank,
            tp_rank,
            asynchronous,
            keep_last,
            keep_every,
            host_budget: None,
            spare: Arc::default(),
            gpu: None,
            in_flight: None,
            gate: None,
        }
    }

    /// Commits through `gate` (see [`CommitGate`]).
    pub fn with_gate(mut self, gate: Option<Arc<dyn CommitGate>>) -> Self {
        self.gate = gate;
        self
    }

    /// Holds at most `bytes` of a save in host memory (copied from the state, not yet
    /// uploaded). `None`: the whole state, so that training waits only for a memory copy,
    /// unless that is more than half the memory available, then that half.
    pub fn with_host_budget(mut self, bytes: Option<u64>) -> Self {
        self.host_budget = bytes;
        self
    }

    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Starts saving the state after `step` steps. Waits for the previous save first (at
    /// most one in flight). Synchronous saves return when the checkpoint is committed.
    /// Returns the previous save, if one finished here, and the seconds training was held.
    pub fn save(
        &mut self,
        step: u64,
        model: &Llama,
        optimizer: &AdamW,
        train_state: serde_json::Value,
    ) -> Result<(Option<Saved>, f64), CheckpointError> {
        let start = Instant::now();
        let previous = self.wait()?;
        let sources = owned_sources(model, optimizer, &self.mesh, self.dp_rank, self.tp_rank);
        let pieces = sources
            .iter()
            .map(|s| (s.region.clone(), Dtype::F32))
            .collect();
        let tensors = [
            model.params.flat.shallow_clone(),
            optimizer.exp_avg.shallow_clone(),
            optimizer.exp_avg_sq.shallow_clone(),
        ];
        let plan = CopyPlan::new(&sources);
        let staged = self.stage(step, &tensors, &plan)?;
        let device_copied = staged.as_ref().map(|s| s.copy.clone());
        let (store, rank, mesh) = (self.store.clone(), self.rank, self.mesh);
        let infos = tensor_infos(model);
        let (keep_last, keep_every, host_budget) =
            (self.keep_last, self.keep_every, self.host_budget);
        let spare = self.spare.clone();
        let gate = self.gate.clone();
        let (copied_tx, copied) = mpsc::channel();
        // The save is a span of the step that started it, however long it outlives the step.
        let span = tracing::info_span!(
            "checkpoint.save",
            kiln.step = step,
            kiln.bytes = tracing::field::Empty
        );
        let work = move || -> Result<Saved, CheckpointError> {
            let _entered = span.enter();
            let t0 = Instant::now();
            // From the page-locked copy once the device has made it; else from the tensors.
            let (from, packed) = match &staged {
                Some(s) => {
                    s.copy.wait().map_err(|message| CheckpointError::Io {
                        object: store.display(step, ""),
                        message: format!("copying the state to host memory: {message}"),
                    })?;
                    (s.packed.each_ref().map(Tensor::shallow_clone), true)
                }
                None => (tensors.each_ref().map(Tensor::shallow_clone), false),
            };
            let mut spare = spare.lock().unwrap_or_else(|p| p.into_inner());
            let info = tch::no_grad(|| {
                store.write_rank_object(
                    step,
                    rank,
                    RankObjectWriter {
                        pieces,
                        fill: &mut |i, range, dst| {
                            copy_out(plan.locate(&sources, i, range, packed), &from, dst)
                        },
                        // From here on training may change the state.
                        copied: &mut || {
                            let _ = copied_tx.send(());
                        },
                        host_budget,
                        spare: &mut spare,
                        rank_state: serde_json::json!({ "rank": rank }),
                    },
                )
            })?;
            drop(spare);
            span.record("kiln.bytes", info.size);
            let upload_s = t0.elapsed().as_secs_f64();
            let (mut committed, mut deleted) = (None, Vec::new());
            if let Some(g) = &gate {
                g.written(step);
            }
            if rank == 0 {
                if let Some(g) = &gate {
                    g.wait_commit(step, commit_timeout()).map_err(|message| {
                        CheckpointError::Io {
                            object: store.display(step, ""),
                            message,
                        }
                    })?;
                }
                // Under a coordinator every rank of this generation has written (it said so
                // before `wait_commit` returned), so anything else in the folder is an
                // earlier attempt's; ranks started by hand have no such word.
                let strays = if gate.is_some() {
                    Strays::Remove
                } else {
                    Strays::Keep
                };
                store.commit(step, mesh, infos, train_state, commit_timeout(), strays)?;
                committed = Some(store.display(step, kiln_checkpoint::layout::MANIFEST));
                deleted = store.retain(step, keep_last, keep_every)?;
            }
            Ok(Saved {
                step,
                bytes: info.size,
                upload_s,
                committed,
                deleted,
            })
        };
        if self.asynchronous {
            let done = std::thread::Builder::new()
                .name("kiln-checkpoint".into())
                .spawn(work)
                .map_err(|e| CheckpointError::Io {
                    object: self.store.display(step, ""),
                    message: format!("cannot start the save thread: {e}"),
                })?;
            self.in_flight = Some(InFlight {
                step,
                copied,
                device_copied,
                done,
            });
            Ok((previous, start.elapsed().as_secs_f64()))
        } else {
            let saved = work()?;
            let _ = previous;
            Ok((Some(saved), start.elapsed().as_secs_f64()))
        }
    }

    /// Call before the parameters or the optimizer state change: blocks until the state
    /// being saved has been copied to host memory, or for a GPU save makes the compute stream
    /// wait for the copy (on the device; the host goes on). Returns the seconds it waited.
    pub fn fence(&mut self) -> f64 {
        let start = Instant::now();
        if let Some(f) = &self.in_flight {
            match &f.device_copied {
                Some(e) => {
                    if e.done().block_compute().is_err() {
                        // The device wait failed: wait on the host instead (an error there is
                        // the copy's, which the save thread reports).
                        let _ = e.wait();
                    }
                }
                // An error in the copy closes the channel; `wait` reports it.
                None => {
                    let _ = f.copied.recv();
                }
            }
        }
        start.elapsed().as_secs_f64()
    }

    /// For CUDA state within the host budget: the copy into page-locked memory, enqueued
    /// now (see the module docs). `None`: the parts are filled from the tensors.
    fn stage(
        &mut self,
        step: u64,
        tensors: &[Tensor; 3],
        plan: &CopyPlan,
    ) -> Result<Option<Staged>, CheckpointError> {
        let Device::Cuda(ordinal) = tensors[0].device() else {
            return Ok(None);
        };
        let bytes: i64 = (0..3).map(|w| plan.packed_len(w) * 4).sum();
        if self.host_budget.is_some_and(|b| (bytes as u64) > b) {
            return Ok(None);
        }
        let io = |message: String| CheckpointError::Io {
            object: self.store.display(step, ""),
            message: format!("copying the state to host memory: {message}"),
        };
        if self.gpu.as_ref().is_none_or(|g| g.ordinal != ordinal) {
            self.gpu = Some(GpuCopy::new(ordinal).map_err(io)?);
        }
        match self.gpu.as_mut() {
            Some(g) => g.stage(tensors, plan).map(Some).map_err(io),
            None => Ok(None),
        }
    }

    /// The save in flight if it has finished (without waiting).
    pub fn poll(&mut self) -> Result<Option<Saved>, CheckpointError> {
        match &self.in_flight {
            Some(f) if f.done.is_finished() => self.wait(),
            _ => Ok(None),
        }
    }

    /// Waits for the save in flight, if any, and returns it.
    pub fn wait(&mut self) -> Result<Option<Saved>, CheckpointError> {
        let Some(f) = self.in_flight.take() else {
            return Ok(None);
        };
        let saved = f.done.join().map_err(|_| CheckpointError::Io {
            object: self.store.display(f.step, ""),
            message: "the save thread panicked".into(),
        })??;
        Ok(Some(saved))
    }
}

/// Loads the state `m` holds into `model` and `optimizer` (laid out for this rank's mesh,
/// whatever the checkpoint's was): reads only the regions this rank holds.
pub fn load(
    store: &CheckpointStore,
    m: &CheckpointManifest,
    model: &Llama,
    optimizer: &mut AdamW,
) -> Result<(), CheckpointError> {
    store.check_sizes(m)?;
    let n = model.params.entries().len();
    let owned = optimizer.owned().to_vec();
    // Every parameter whole, or fully sharded only this rank's chunks of them.
    let sharded = model.params.sharding().is_some();
    let whole: Vec<Source> = if sharded {
        Vec::new()
    } else {
        (0..n)
            .map(|i| {
                let (name, offsets, shape, _) = param_box(model, i);
                Source {
                    region: Region::boxed(&name, offsets, shape),
                    which: 0,
                    at: model.params.entries()[i].offset,
                }
            })
            .collect()
    };
    let state = sources(model, &owned, &state_offsets(&owned), sharded, true, true);
    let all: Vec<&Source> = whole.iter().chain(&state).collect();
    let regions: Vec<Region> = all.iter().map(|s| s.region.clone()).collect();
    let targets = [
        model.params.flat.shallow_clone(),
        optimizer.exp_avg.shallow_clone(),
        optimizer.exp_avg_sq.shallow_clone(),
    ];
    // Read straight into the tensors' memory on the CPU; through host copies elsewhere.
    let on_host = targets
        .iter()
        .all(|t| t.device() == Device::Cpu && t.is_contiguous());
    let staged: Vec<Tensor> = if on_host {
        targets.iter().map(Tensor::shallow_clone).collect()
    } else {
        targets
            .iter()
            .map(|t| Tensor::zeros(t.size(), (Kind::Float, Device::Cpu)))
            .collect()
    };
    let host_err = |e: crate::collective::CollectiveError| CheckpointError::Io {
        object: store.display(m.step, ""),
        message: e.to_string(),
    };
    let read = |bufs: [&mut [u8]; 3]| -> Result<(), CheckpointError> {
        // Each region's bytes, carved from its tensor in offset order (they are disjoint).
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by_key(|&i| (all[i].which, all[i].at));
        let mut rest = bufs;
        let mut base = [0usize; 3];
        let mut dsts: Vec<&mut [u8]> = (0..all.len()).map(|_| Default::default()).collect();
        for i in order {
            let s = all[i];
            let (w, start) = (s.which, s.at as usize * 4);
            let len = s.region.numel() as usize * 4;
            let buf = std::mem::take(&mut rest[w]);
            let (_, tail) = buf.split_at_mut(start - base[w]);
            let (mine, tail) = tail.split_at_mut(len);
            rest[w] = tail;
            base[w] = start + len;
            dsts[i] = mine;
        }
        store.read_into(m, &regions, &mut dsts)
    };
    host::with_bytes_mut(&staged[0], |p| {
        host::with_bytes_mut(&staged[1], |a| {
            host::with_bytes_mut(&staged[2], |b| read([p, a, b]))
        })
    })
    .map_err(host_err)?
    .map_err(host_err)?
    .map_err(host_err)??;
    if !on_host {
        tch::no_grad(|| {
            for (t, s) in targets.iter().zip(&staged) {
                t.shallow_clone().copy_(s);
            }
        });
    }
    Ok(())
}
