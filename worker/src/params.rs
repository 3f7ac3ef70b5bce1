//! Parameters and gradients in one flat buffer each.
//!
//! Every parameter is a view into [`ParamStore::flat`], and its gradient lives at the same
//! offsets in [`ParamStore::grad`]. The optimizer then runs as a handful of large element-wise
//! ops over the whole buffer, and collectives can reduce contiguous ranges of it.
//!
//! The buffer is laid out in segments — the embedding, each transformer block, the head — in
//! forward order, and inside each segment the weight-decayed parameters come first, so "the
//! decayed part of segment s" is one contiguous range.
//!
//! A fully sharded store ([`ParamStore::new_sharded`]) keeps only this rank's chunk of each
//! segment: `flat` and `grad` are then the shard, and a segment's whole parameters exist only
//! while it is gathered (see [`crate::fsdp`]). Offsets ("flat coordinates") always mean the
//! whole store's layout; [`ParamStore::locate`] maps them into the buffers.

use std::collections::HashMap;
use std::ops::Range;

use tch::{Device, Kind, Tensor};

use crate::collective::CollectiveError;
use crate::fsdp::Sharding;

/// What the store needs to know about one parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    /// Whether AdamW's decoupled weight decay applies.
    pub decay: bool,
    /// Index of the segment the parameter belongs to.
    pub segment: usize,
    /// Set when this rank holds only a slice of the full tensor (tensor parallelism).
    pub shard: Option<Shard>,
}

/// This rank's slice of a tensor-parallel parameter: `shape[dim]` entries from `start` of the
/// full tensor's `full` along dimension `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub start: i64,
    pub full: i64,
}

impl ParamSpec {
    /// The shape of the whole parameter, across all tensor-parallel ranks.
    pub fn full_shape(&self) -> Vec<i64> {
        let mut shape = self.shape.clone();
        if let Some(s) = self.shard {
            shape[s.dim] = s.full;
        }
        shape
    }

    /// This rank's slice of `full` (the whole parameter).
    pub fn slice_of(&self, full: &Tensor) -> Tensor {
        match self.shard {
            Some(s) => full.narrow(s.dim as i64, s.start, self.shape[s.dim]),
            None => full.shallow_clone(),
        }
    }
}

#[derive(Debug)]
pub struct ParamEntry {
    pub spec: ParamSpec,
    /// Where the parameter starts in flat coordinates.
    pub offset: i64,
    pub numel: i64,
    /// A view of `flat` that autograd treats as a leaf (an empty tensor in a fully sharded
    /// store: see [`ParamStore::view`]).
    view: Tensor,
}

/// A contiguous range of the flat buffer.
#[derive(Debug, Clone)]
pub struct Segment {
    pub name: String,
    pub range: Range<i64>,
    /// The prefix of `range` holding weight-decayed parameters.
    pub decay_end: i64,
}

#[derive(Debug)]
pub struct ParamStore {
    /// Every parameter back to back in fp32; in a fully sharded store, this rank's chunk of
    /// each segment, back to back.
    pub flat: Tensor,
    /// The gradients, laid out as `flat`.
    pub grad: Tensor,
    entries: Vec<ParamEntry>,
    by_name: HashMap<String, usize>,
    segments: Vec<Segment>,
    sharding: Option<Sharding>,
}

impl ParamStore {
    /// Lays out `specs` (segment names in `segments`) in fp32 zeros on `device`. Parameters
    /// keep the order of `specs` within their segment and decay class.
    pub fn new(segments: &[String], specs: Vec<ParamSpec>, device: Device) -> Self {
        Self::build(segments, specs, device, None)
    }

    /// Lays out `specs` as [`ParamStore::new`] does, but holds only this rank's chunk of each
    /// segment among the ranks of `group` (fully sharded data parallelism), in fp32 zeros.
    pub fn new_sharded(
        segments: &[String],
        specs: Vec<ParamSpec>,
        device: Device,
        groups: crate::fsdp::Groups,
    ) -> Self {
        Self::build(segments, specs, device, Some(groups))
    }

    fn build(
        segments: &[String],
        specs: Vec<ParamSpec>,
        device: Device,
        groups: Option<crate::fsdp::Groups>,
    ) -> Self {
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by_key(|&i| (specs[i].segment, !specs[i].decay));
        let mut offset = 0i64;
        let mut placed = Vec::with_capacity(specs.len());
        let mut segs: Vec<Segment> = segments
            .iter()
            .map(|name| Segment {
                name: name.clone(),
                range: 0..0,
                decay_end: 0,
            })
            .collect();
        for (s, seg) in segs.iter_mut().enumerate() {
            seg.range.start = offset;
            seg.decay_end = offset;
            for &i in order.iter().filter(|&&i| specs[i].segment == s) {
                let numel: i64 = specs[i].shape.iter().product();
                placed.push((i, offset, numel));
                offset += numel;
                if specs[i].decay {
                    seg.decay_end = offset;
                }
            }
            seg.range.end = offset;
        }
        let ranges: Vec<Range<i64>> = segs.iter().map(|s| s.range.clone()).collect();
        let sharding = groups.map(|g| Sharding::new(g, &ranges, device));
        let local = sharding.as_ref().map_or(offset, Sharding::shard_numel);
        let flat = Tensor::zeros([local], (Kind::Float, device));
        let grad = Tensor::zeros([local], (Kind::Float, device));
        let mut entries: Vec<Option<ParamEntry>> = (0..specs.len()).map(|_| None).collect();
        for (i, off, numel) in placed {
            let spec = specs[i].clone();
            let view = match sharding {
                Some(_) => Tensor::zeros([0], (Kind::Float, device)),
                None => flat
                    .narrow(0, off, numel)
                    .view(spec.shape.as_slice())
                    .set_requires_grad(true),
            };
            entries[i] = Some(ParamEntry {
                spec,
                offset: off,
                numel,
                view,
            });
        }
        let entries: Vec<ParamEntry> = entries.into_iter().flatten().collect();
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.spec.name.clone(), i))
            .collect();
        ParamStore {
            flat,
            grad,
            entries,
            by_name,
            segments: segs,
            sharding,
        }
    }

    /// The fully sharded layout, when this store is one.
    pub fn sharding(&self) -> Option<&Sharding> {
        self.sharding.as_ref()
    }

    /// Where flat coordinate `x` lives in `flat` and `grad`: `x` itself, or in a fully
    /// sharded store its place in this rank's shard (`x` must lie in one of its chunks).
    pub fn locate(&self, x: i64) -> i64 {
        match &self.sharding {
            None => x,
            Some(sh) => sh.locate(x),
        }
    }

    /// Frees the gradient buffer, for a store that only holds weights (inference, export):
    /// half of its memory. Training on it afterwards panics.
    pub fn release_grads(&mut self) {
        self.grad = Tensor::zeros([0], (Kind::Float, self.device()));
    }

    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Parameter `i`, as a tensor autograd treats as a leaf: a view of `flat`, or in a fully
    /// sharded store a view of its gathered segment (which must be gathered).
    pub fn view(&self, i: usize) -> Tensor {
        match &self.sharding {
            None => self.entries[i].view.shallow_clone(),
            Some(sh) => sh.view(i, &self.entries[i].spec.name),
        }
    }

    /// The number of parameters in the whole store (this rank's tensor-parallel slice of the
    /// model, all of it even when fully sharded).
    pub fn numel(&self) -> i64 {
        self.segments.last().map_or(0, |s| s.range.end)
    }

    /// Gathers segment `s`'s parameters from the ranks that shard it (a no-op unsharded or
    /// when gathered already). Every rank of the group must gather the same segments in the
    /// same order.
    pub fn gather(&self, s: usize) -> Result<(), CollectiveError> {
        match &self.sharding {
            None => Ok(()),
            Some(sh) => sh.gather(s, &self.flat, &self.entries),
        }
    }

    /// Starts gathering segment `s` in the background; [`ParamStore::gather`] waits for it.
    pub fn prefetch(&self, s: usize) {
        if let Some(sh) = &self.sharding {
            sh.prefetch(s, &self.flat);
        }
    }

    /// Frees segment `s`'s gathered parameters (what autograd still holds stays alive).
    pub fn release(&self, s: usize) {
        if let Some(sh) = &self.sharding {
            sh.release(s);
        }
    }

    /// After segment `s`'s forward pass, when autograd keeps its parameters for the backward
    /// pass: frees their memory under the saved views if the store reshards after forward
    /// ([`Sharding::reshard`]); [`ParamStore::gather`] fills them again.
    pub fn reshard(&self, s: usize) {
        if let Some(sh) = &self.sharding {
            sh.reshard(s);
        }
    }

    /// Frees every gathered segment.
    pub fn release_all(&self) {
        for s in 0..self.segments.len() {
            self.release(s);
        }
    }

    pub fn device(&self) -> Device {
        self.flat.device()
    }

    /// Overwrites parameter `i` with `value` (any device, any float kind; same shape).
    pub fn set(&self, i: usize, value: &Tensor) {
        let e = &self.entries[i];
        let value = value.reshape([-1]);
        tch::no_grad(|| match &self.sharding {
            None => {
                self.flat.narrow(0, e.offset, e.numel).copy_(&value);
            }
            Some(sh) => {
                // Only the part of the parameter in this rank's chunk.
                let s = e.spec.segment;
                let chunk = &sh.chunks[s];
                let (lo, hi) = (chunk.start.max(e.offset), chunk.end.min(e.offset + e.numel));
                if hi > lo {
                    self.flat.narrow(0, sh.locate(lo), hi - lo).copy_(
                        &value
                            .narrow(0, lo - e.offset, hi - lo)
                            .to_device(self.device()),
                    );
                }
            }
        });
    }

    /// Overwrites parameter `i` with this rank's slice of `full`, the whole parameter.
    pub fn set_full(&self, i: usize, full: &Tensor) {
        self.set(i, &self.entries[i].spec.slice_of(full));
    }

    /// The gradient of parameter `i`: a view of [`ParamStore::grad`] (not in a fully
    /// sharded store, which holds no whole gradients).
    pub fn grad_of(&self, i: usize) -> Tensor {
        assert!(
            self.sharding.is_none(),
            "a fully sharded store holds no whole gradient"
        );
        let e = &self.entries[i];
        self.grad
            .narrow(0, e.offset, e.numel)
            .view(e.spec.shape.as_slice())
    }

    /// Adds `g` into the gradient of parameter `i`, or replaces it with `overwrite`.
    /// In a fully sharded store, into the segment's whole gradient, which
    /// [`ParamStore::reduce_segment`] hands to the shards.
    pub fn add_grad(&self, i: usize, g: &Tensor, overwrite: bool) {
        let e = &self.entries[i];
        if let Some(sh) = &self.sharding {
            let s = e.spec.segment;
            let at = e.offset - self.segments[s].range.start;
            sh.add_grad(s, at, g, overwrite);
            return;
        }
        tch::no_grad(|| {
            let mut slot = self.grad.narrow(0, e.offset, e.numel);
            let g = g.reshape([-1]).to_kind(Kind::Float);
            if overwrite {
                slot.copy_(&g);
            } else {
                let _ = slot.g_add_(&g);
            }
        });
    }

    /// Fully sharded: segment `s`'s whole gradient is complete on every rank. It is averaged
    /// over the group in the background, and this rank's chunk replaces (`overwrite`) or is
    /// added to its shard of `grad`; [`ParamStore::wait_reduced`] waits for it.
    pub fn reduce_segment(&self, s: usize, overwrite: bool) {
        if let Some(sh) = &self.sharding {
            sh.reduce(s, &self.grad, overwrite);
        }
    }

    /// Waits for every segment handed to [`ParamStore::reduce_segment`]; the seconds the
    /// background thread spent in those collectives.
    pub fn wait_reduced(&self) -> Result<f64, CollectiveError> {
        match &self.sharding {
            None => Ok(0.0),
            Some(sh) => sh.wait_reduced(),
        }
    }

    /// Adds per-parameter gradients (in spec order, as `run_backward` returns them) into the
    /// flat gradient buffer, or, with `overwrite`, replaces its contents (the first
    /// micro-batch of a step, which saves zeroing the buffer first).
    pub fn accumulate_grads(&self, grads: &[Tensor], overwrite: bool) {
        for (i, g) in grads.iter().enumerate() {
            self.add_grad(i, g, overwrite);
        }
    }
}
