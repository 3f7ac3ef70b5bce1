//! Reading a save's state out of the flat tensors: the plan of which elements a save reads
//! ([`CopyPlan`]: the sources merged into contiguous runs per tensor, each with its place in
//! a packed copy), the copy of a part straight from the tensors ([`copy_out`]), and for CUDA
//! tensors the copy through page-locked host buffers on a copy stream ([`GpuCopy`]), ordered
//! against the compute stream as the checkpoint module's docs describe.

use std::ops::Range;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::Source;
use crate::cuda::{Context, Event, HostCopy, Stream, ToHost};

/// A contiguous range of elements of one flat tensor that a save reads, and where it starts
/// in the packed copy of that tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) src: Range<i64>,
    pub(super) packed_at: i64,
}

/// Where a save's bytes come from: per flat tensor (parameters, `exp_avg`, `exp_avg_sq`), the
/// element ranges the sources cover merged into runs, and each source's place in the packed
/// copy. Shared by the copy from the tensors themselves and the copy through page-locked
/// buffers (see the checkpoint module's docs).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CopyPlan {
    pub(super) runs: [Vec<Run>; 3],
    /// Per source: its first element in the packed copy of its tensor.
    pub(super) packed_at: Vec<i64>,
}

impl CopyPlan {
    pub(super) fn new(sources: &[Source]) -> CopyPlan {
        let mut runs: [Vec<Run>; 3] = Default::default();
        let mut order: Vec<usize> = (0..sources.len()).collect();
        order.sort_by_key(|&i| (sources[i].which, sources[i].at));
        let mut packed_at = vec![0i64; sources.len()];
        for i in order {
            let s = &sources[i];
            let (lo, n) = (s.at, s.region.numel() as i64);
            let runs = &mut runs[s.which];
            match runs.last_mut() {
                Some(r) if r.src.end == lo => r.src.end += n,
                last => {
                    let packed = last.map_or(0, |r| r.packed_at + (r.src.end - r.src.start));
                    runs.push(Run {
                        src: lo..lo + n,
                        packed_at: packed,
                    });
                }
            }
            let r = runs.last().unwrap_or_else(|| unreachable!());
            packed_at[i] = r.packed_at + (lo - r.src.start);
        }
        CopyPlan { runs, packed_at }
    }

    /// Elements in the packed copy of tensor `which`.
    pub(super) fn packed_len(&self, which: usize) -> i64 {
        self.runs[which]
            .last()
            .map_or(0, |r| r.packed_at + (r.src.end - r.src.start))
    }

    /// Bytes `range` of source `i` (f32 elements): its tensor, and the first element and the
    /// number of elements, in the tensor itself or (`packed`) in its packed copy.
    pub(super) fn locate(
        &self,
        sources: &[Source],
        i: usize,
        range: Range<u64>,
        packed: bool,
    ) -> Locus {
        let s = &sources[i];
        let first = (range.start / 4) as i64;
        Locus {
            which: s.which,
            start: first + if packed { self.packed_at[i] } else { s.at },
            len: ((range.end - range.start) / 4) as i64,
        }
    }
}

/// Elements `start..start + len` of flat tensor `which`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Locus {
    which: usize,
    start: i64,
    len: i64,
}

/// Copies the elements `at` of `tensors` into `dst`.
pub(super) fn copy_out(at: Locus, tensors: &[Tensor; 3], dst: &mut [u8]) {
    let mut part = tensors[at.which].narrow(0, at.start, at.len);
    if part.device() != Device::Cpu {
        part = part.to_device(Device::Cpu);
    }
    part.copy_data_u8(dst, at.len as usize);
}

/// The copy of a save's state out of GPU memory: the page-locked packed copies and the event
/// after which they hold the state.
pub(super) struct Staged {
    pub(super) packed: [Tensor; 3],
    pub(super) copy: Arc<HostCopy>,
}

/// The saver's resources for GPU saves, kept from one save to the next.
pub(super) struct GpuCopy {
    pub(super) ordinal: usize,
    stream: Stream,
    ctx: Arc<Context>,
    /// Page-locked packed copies of the last save's size.
    packed: Option<[Tensor; 3]>,
}

impl GpuCopy {
    pub(super) fn new(ordinal: usize) -> Result<GpuCopy, String> {
        let ctx = Context::primary(ordinal)?;
        let stream = Stream::new(&ctx)?;
        Ok(GpuCopy {
            ordinal,
            stream,
            ctx,
            packed: None,
        })
    }

    /// Enqueues the copy of `plan`'s runs of `tensors` into the page-locked buffers, ordered
    /// after the compute stream's work so far (see the checkpoint module's docs).
    pub(super) fn stage(
        &mut self,
        tensors: &[Tensor; 3],
        plan: &CopyPlan,
    ) -> Result<Staged, String> {
        let lens: Vec<i64> = (0..3).map(|w| plan.packed_len(w)).collect();
        let reuse = self
            .packed
            .as_ref()
            .is_some_and(|p| p.iter().zip(&lens).all(|(t, &n)| t.numel() as i64 == n));
        if !reuse {
            self.packed = None;
            let device = Device::Cuda(self.ordinal);
            let mut bufs = Vec::with_capacity(3);
            for &n in &lens {
                let t = Tensor::empty([n], (Kind::Float, Device::Cpu))
                    .f_pin_memory(device)
                    .map_err(|e| format!("allocating page-locked memory: {e}"))?;
                bufs.push(t);
            }
            let [a, b, c]: [Tensor; 3] = bufs
                .try_into()
                .map_err(|_| "three page-locked buffers".to_string())?;
            self.packed = Some([a, b, c]);
        }
        let packed = self
            .packed
            .as_ref()
            .ok_or_else(|| "no page-locked buffers".to_string())?;
        let taken = Event::on_compute(&self.ctx)?;
        let copies: Vec<ToHost<'_>> = plan
            .runs
            .iter()
            .enumerate()
            .flat_map(|(w, runs)| {
                runs.iter().map(move |r| ToHost {
                    src: &tensors[w],
                    src_at: r.src.start,
                    dst: &packed[w],
                    dst_at: r.packed_at,
                    len: r.src.end - r.src.start,
                })
            })
            .collect();
        let copy = HostCopy::start(&self.stream, &taken, &copies)?;
        Ok(Staged {
            packed: packed.each_ref().map(Tensor::shallow_clone),
            copy: Arc::new(copy),
        })
    }
}

#[cfg(test)]
mod tests {
    use kiln_checkpoint::Region;

    use super::*;

    fn source(which: usize, at: i64, n: u64) -> Source {
        Source {
            region: Region {
                tensor: format!("t{which}@{at}"),
                offsets: vec![0],
                shape: vec![n],
                flat: 0..n,
            },
            which,
            at,
        }
    }

    #[test]
    fn the_copy_plan_merges_touching_sources_into_runs() {
        // Parameters: two touching pieces, a gap (a piece another rank writes), one more;
        // the state: back-to-back pieces, listed out of order.
        let sources = [
            source(0, 0, 10),
            source(1, 10, 5),
            source(0, 10, 5),
            source(1, 0, 10),
            source(0, 40, 3),
            source(2, 0, 15),
        ];
        let plan = CopyPlan::new(&sources);
        let run = |src: Range<i64>, packed_at| Run { src, packed_at };
        assert_eq!(plan.runs[0], [run(0..15, 0), run(40..43, 15)]);
        assert_eq!(plan.runs[1], [run(0..15, 0)]);
        assert_eq!(plan.runs[2], [run(0..15, 0)]);
        assert_eq!(plan.packed_at, [0, 10, 10, 0, 15, 0]);
        assert_eq!(
            (0..3).map(|w| plan.packed_len(w)).collect::<Vec<_>>(),
            [18, 15, 15]
        );
        assert_eq!(
            plan.locate(&sources, 4, 4..12, false),
            Locus {
                which: 0,
                start: 41,
                len: 2
            }
        );
        assert_eq!(plan.locate(&sources, 4, 4..12, true).start, 16);
    }

    #[test]
    fn parts_filled_from_the_packed_copy_equal_parts_filled_from_the_tensors() {
        let sources = [
            source(0, 3, 7),
            source(0, 10, 2),
            source(0, 50, 9),
            source(1, 0, 7),
            source(1, 7, 11),
            source(2, 0, 18),
        ];
        let plan = CopyPlan::new(&sources);
        let tensors: [Tensor; 3] =
            [0, 1, 2].map(|w| Tensor::arange(64, (Kind::Float, Device::Cpu)) + 100.0 * w as f64);
        // The device copies, done on the CPU: one per run.
        let packed: [Tensor; 3] = [0, 1, 2].map(|w| {
            let p = Tensor::zeros([plan.packed_len(w)], (Kind::Float, Device::Cpu));
            for r in &plan.runs[w] {
                let n = r.src.end - r.src.start;
                p.narrow(0, r.packed_at, n)
                    .copy_(&tensors[w].narrow(0, r.src.start, n));
            }
            p
        });
        assert_eq!(plan.runs[0].len(), 2);
        for (i, s) in sources.iter().enumerate() {
            let bytes = s.region.numel() * 4;
            // The whole piece, and a part boundary inside it.
            for range in [0..bytes, 4..bytes - 4, 0..4] {
                let len = (range.end - range.start) as usize;
                let (mut direct, mut staged) = (vec![0u8; len], vec![1u8; len]);
                copy_out(
                    plan.locate(&sources, i, range.clone(), false),
                    &tensors,
                    &mut direct,
                );
                copy_out(
                    plan.locate(&sources, i, range.clone(), true),
                    &packed,
                    &mut staged,
                );
                assert_eq!(direct, staged, "source {i}, bytes {range:?}");
            }
        }
    }
}
