//! Parameters and gradients in one flat buffer each.
//!
//! Every parameter is a view into [`ParamStore::flat`], and its gradient lives at the same
//! offsets in [`ParamStore::grad`]. The optimizer then runs as a handful of large element-wise
//! ops over the whole buffer, and collectives can reduce contiguous ranges of it.
//!
//! The buffer is laid out in segments — the embedding, each transformer block, the head — in
//! forward order, and inside each segment the weight-decayed parameters come first, so "the
//! decayed part of segment s" is one contiguous range.

use std::collections::HashMap;
use std::ops::Range;

use tch::{Device, Kind, Tensor};

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
    pub offset: i64,
    pub numel: i64,
    /// A view of `flat` that autograd treats as a leaf.
    pub view: Tensor,
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
    pub flat: Tensor,
    pub grad: Tensor,
    entries: Vec<ParamEntry>,
    by_name: HashMap<String, usize>,
    segments: Vec<Segment>,
}

impl ParamStore {
    /// Lays out `specs` (segment names in `segments`) in fp32 zeros on `device`. Parameters
    /// keep the order of `specs` within their segment and decay class.
    pub fn new(segments: &[String], specs: Vec<ParamSpec>, device: Device) -> Self {
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
        let flat = Tensor::zeros([offset], (Kind::Float, device));
        let grad = Tensor::zeros([offset], (Kind::Float, device));
        let mut entries: Vec<Option<ParamEntry>> = (0..specs.len()).map(|_| None).collect();
        for (i, off, numel) in placed {
            let spec = specs[i].clone();
            let view = flat
                .narrow(0, off, numel)
                .view(spec.shape.as_slice())
                .set_requires_grad(true);
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

    /// The parameter views, in spec order: the inputs to `run_backward`.
    pub fn views(&self) -> Vec<&Tensor> {
        self.entries.iter().map(|e| &e.view).collect()
    }

    pub fn view(&self, i: usize) -> &Tensor {
        &self.entries[i].view
    }

    pub fn numel(&self) -> i64 {
        self.flat.size1().unwrap_or(0)
    }

    pub fn device(&self) -> Device {
        self.flat.device()
    }

    /// Overwrites parameter `i` with `value` (any device, any float kind; same shape).
    pub fn set(&self, i: usize, value: &Tensor) {
        let e = &self.entries[i];
        tch::no_grad(|| {
            self.flat
                .narrow(0, e.offset, e.numel)
                .copy_(&value.reshape([-1]));
        });
    }

    /// Overwrites parameter `i` with this rank's slice of `full`, the whole parameter.
    pub fn set_full(&self, i: usize, full: &Tensor) {
        self.set(i, &self.entries[i].spec.slice_of(full));
    }

    /// The gradient of parameter `i`: a view of [`ParamStore::grad`].
    pub fn grad_of(&self, i: usize) -> Tensor {
        let e = &self.entries[i];
        self.grad
            .narrow(0, e.offset, e.numel)
            .view(e.spec.shape.as_slice())
    }

    /// Adds `g` into the gradient of parameter `i`, or replaces it with `overwrite`.
    pub fn add_grad(&self, i: usize, g: &Tensor, overwrite: bool) {
        let e = &self.entries[i];
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

    /// Adds per-parameter gradients (in spec order, as `run_backward` returns them) into the
    /// flat gradient buffer, or, with `overwrite`, replaces its contents (the first
    /// micro-batch of a step, which saves zeroing the buffer first).
    pub fn accumulate_grads(&self, grads: &[Tensor], overwrite: bool) {
        for (i, g) in grads.iter().enumerate() {
            self.add_grad(i, g, overwrite);
        }
    }
}
