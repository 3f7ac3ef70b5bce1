//! Collective communication between worker processes.
//!
//! [`Collective`] is the one interface the trainer uses: all-reduce, broadcast, all-gather,
//! reduce-scatter and barrier, on whole tensors and on flat ranges of the parameter and
//! gradient buffers ("buckets"). Two backends implement it:
//!
//! - [`tcp::TcpRing`]: a ring over TCP for CPU tensors — reduce-scatter then all-gather,
//!   each chunk cut into segments that are sent while the next one is received and reduced,
//!   the algorithm Gloo and NCCL use. It works on any machine, so multi-process training is
//!   tested everywhere.
//! - [`nccl::NcclComm`]: NCCL through `cudarc`, loaded at run time, on CUDA tensors.
//!
//! [`mesh::ProcessGroups`] builds the world, data-parallel and tensor-parallel groups of a
//! `dp x tp` mesh in one place.
//!
//! # Deferred collectives
//!
//! Data parallelism reduces gradient buckets on a communication thread while backward still
//! runs. On a GPU the training thread marks, on the compute stream, the point where a bucket
//! is complete ([`Collective::ready_marker`]); the communication thread enqueues the bucket's
//! collective after that point ([`Collective::all_reduce_after`],
//! [`Collective::reduce_scatter_flat_after`]) without making the compute stream wait for it;
//! and the training thread makes the compute stream wait for every deferred collective only
//! where it needs their results ([`Collective::wait_pending`]). Backends that work
//! synchronously on host memory (TCP) have no markers: their deferred operations are the plain
//! ones, finished when they return, and `wait_pending` has nothing to do.

pub mod conformance;
pub(crate) mod host;
pub mod mesh;
pub mod nccl;
pub mod tcp;

use std::fmt::Debug;
use std::ops::Range;

use half::{bf16, f16};

use crate::cuda;
use tch::{Kind, Tensor};

pub use mesh::{ParallelDims, ProcessGroups};

/// How values from the ranks combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the group size (integer division for integer tensors).
    Avg,
    Max,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectiveError {
    #[error("lost rank {peer} ({addr}) during {op}: {what}")]
    PeerLost {
        peer: usize,
        addr: String,
        op: &'static str,
        what: String,
    },
    #[error("rank {dead} failed during {op} (reported by rank {reporter})")]
    Aborted {
        dead: usize,
        reporter: usize,
        op: &'static str,
    },
    #[error(
        "waited {secs} s for rank {peer} ({addr}) during {op}; it is hung or far behind (set KILN_COLLECTIVE_TIMEOUT_S to wait longer)"
    )]
    Timeout {
        peer: usize,
        addr: String,
        op: &'static str,
        secs: u64,
    },
    #[error("cannot reach rank {peer} at {addr} within {secs} s: {what}")]
    Connect {
        peer: usize,
        addr: String,
        secs: u64,
        what: String,
    },
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("{0}")]
    Invalid(String),
    #[error("NCCL: {0}")]
    Nccl(String),
}

impl CollectiveError {
    /// The rank this error blames, if it blames one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CollectiveError::PeerLost { peer, .. }
            | CollectiveError::Timeout { peer, .. }
            | CollectiveError::Connect { peer, .. } => Some(*peer),
            CollectiveError::Aborted { dead, .. } => Some(*dead),
            _ => None,
        }
    }
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

#[cfg(test)]
mod error_tests {
    use super::CollectiveError;

    /// The coordinator reads which rank a failed rank lost from its error's text
    /// (`kiln_proto::control::gone_rank`): the two errors that say a rank is gone must keep
    /// the form it reads.
    #[test]
    fn the_coordinator_reads_the_lost_rank_from_the_message() {
        let lost = CollectiveError::PeerLost {
            peer: 5,
            addr: "10.0.0.9:7000".into(),
            op: "all_reduce",
            what: "it closed the connection (did the process exit?)".into(),
        };
        let aborted = CollectiveError::Aborted {
            dead: 6,
            reporter: 7,
            op: "broadcast",
        };
        let timeout = CollectiveError::Timeout {
            peer: 8,
            addr: "h:1".into(),
            op: "all_gather",
            secs: 60,
        };
        let read = |e: &CollectiveError| kiln_proto::control::gone_rank(&format!("error: {e}"));
        assert_eq!(read(&lost), Some(5));
        assert_eq!(read(&aborted), Some(6));
        // A hung rank is not reported gone.
        assert_eq!(read(&timeout), None);
    }
}

/// A point on a device's compute stream, recorded by [`Collective::ready_marker`]: the
/// collective handed it runs after everything the compute stream had been given before it.
pub struct ReadyMarker(pub(crate) cuda::Event);

impl Debug for ReadyMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadyMarker")
    }
}

/// A group of ranks that communicate. Every member must call the same operations in the same
/// order with tensors of the same shape and kind; ranks are numbered `0..size()` within the
/// group.
///
/// Operations work in place on whole tensors or on views of a flat buffer (`narrow` of a
/// 1-D tensor is contiguous). The `*_flat` operations split a buffer into `size()` chunks as
/// [`chunk_range`] does: chunk `r` belongs to rank `r`.
pub trait Collective: Send + Sync + Debug {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Replaces `t` on every rank with the reduction of all ranks' `t`.
    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()>;
    /// Replaces `t` on every rank with rank `root`'s `t`.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()>;
    /// After the call, chunk `rank()` of `buf` holds the reduction of that chunk over all
    /// ranks; the other chunks hold unspecified values.
    fn reduce_scatter_flat(&self, buf: &Tensor, op: ReduceOp) -> Result<()>;
    /// Fills every chunk `r` of `buf` with rank `r`'s chunk `r`.
    fn all_gather_flat(&self, buf: &Tensor) -> Result<()>;
    fn barrier(&self) -> Result<()>;

    /// Marks the current end of the compute stream for a later `*_after` call, possibly from
    /// another thread (see the module docs). `None` for backends that work synchronously.
    fn ready_marker(&self) -> Result<Option<ReadyMarker>> {
        Ok(None)
    }

    /// [`Collective::all_reduce`] ordered after `ready` (after "now" without one), whose
    /// result the compute stream is only guaranteed to see after [`Collective::wait_pending`].
    /// `t` must stay allocated until then.
    fn all_reduce_after(&self, t: &Tensor, op: ReduceOp, ready: Option<ReadyMarker>) -> Result<()> {
        let _ = ready;
        self.all_reduce(t, op)
    }

    /// [`Collective::reduce_scatter_flat`] ordered as [`Collective::all_reduce_after`].
    fn reduce_scatter_flat_after(
        &self,
        buf: &Tensor,
        op: ReduceOp,
        ready: Option<ReadyMarker>,
    ) -> Result<()> {
        let _ = ready;
        self.reduce_scatter_flat(buf, op)
    }

    /// Makes the compute stream wait (on the device, without blocking the host) for every
    /// `*_after` operation enqueued so far.
    fn wait_pending(&self) -> Result<()> {
        Ok(())
    }

    /// `output` (`size()` times as many elements as `input`, same kind) receives every rank's
    /// `input`, in rank order.
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        let n = input.numel() as i64;
        check_multiple(output, input, self.size(), "all_gather")?;
        let flat = output.reshape([-1]);
        tch::no_grad(|| {
            flat.narrow(0, self.rank() as i64 * n, n)
                .copy_(&input.reshape([-1]))
        });
        self.all_gather_flat(&flat)?;
        write_back(output, &flat);
        Ok(())
    }

    /// `output` receives the reduction over ranks of chunk `rank()` of `input` (`size()` times
    /// as many elements as `output`). `input` is left unchanged.
    fn reduce_scatter(&self, input: &Tensor, output: &Tensor, op: ReduceOp) -> Result<()> {
        check_multiple(input, output, self.size(), "reduce_scatter")?;
        let n = output.numel() as i64;
        let work = input.reshape([-1]).copy();
        self.reduce_scatter_flat(&work, op)?;
        tch::no_grad(|| {
            output
                .view([-1])
                .copy_(&work.narrow(0, self.rank() as i64 * n, n))
        });
        Ok(())
    }
}

fn check_multiple(big: &Tensor, small: &Tensor, size: usize, op: &str) -> Result<()> {
    if big.numel() != small.numel() * size || big.kind() != small.kind() {
        return Err(CollectiveError::Invalid(format!(
            "{op}: expected {size} x {} elements of {:?}, got {} of {:?}",
            small.numel(),
            small.kind(),
            big.numel(),
            big.kind()
        )));
    }
    Ok(())
}

/// Copies `from` into `to` unless they are the same memory (a reshape that did not copy).
fn write_back(to: &Tensor, from: &Tensor) {
    if to.data_ptr() != from.data_ptr() {
        tch::no_grad(|| to.shallow_clone().copy_(&from.view_as(to)));
    }
}

/// Chunk `i` of `n` elements split among `parts` ranks: the first `n % parts` chunks hold one
/// element more.
pub fn chunk_range(n: usize, parts: usize, i: usize) -> Range<usize> {
    let base = n / parts;
    let extra = n % parts;
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// The element types collectives handle, and how to reduce them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F64,
    Bf16,
    F16,
    I32,
    I64,
    U8,
    I8,
}

impl Elem {
    pub(crate) fn of(kind: Kind) -> Result<Self> {
        Ok(match kind {
            Kind::Float => Elem::F32,
            Kind::Double => Elem::F64,
            Kind::BFloat16 => Elem::Bf16,
            Kind::Half => Elem::F16,
            Kind::Int => Elem::I32,
            Kind::Int64 => Elem::I64,
            Kind::Uint8 | Kind::Bool => Elem::U8,
            Kind::Int8 => Elem::I8,
            other => {
                return Err(CollectiveError::Invalid(format!(
                    "collectives do not support {other:?} tensors"
                )))
            }
        })
    }

    pub(crate) fn size(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::Bf16 | Elem::F16 => 2,
            Elem::U8 | Elem::I8 => 1,
        }
    }

    /// `dst = dst (op) src`, element-wise over little-endian bytes. `Avg` adds here; the
    /// division happens once, in [`Elem::scale_avg`].
    pub(crate) fn reduce(self, op: ReduceOp, dst: &mut [u8], src: &[u8]) {
        let max = op == ReduceOp::Max;
        match self {
            Elem::F32 => zip::<4>(dst, src, |a, b| {
                let (a, b) = (f32::from_le_bytes(a), f32::from_le_bytes(b));
                (if max { a.max(b) } else { a + b }).to_le_bytes()
            }),
            Elem::F64 => zip::<8>(dst, src, |a, b| {
                let (a, b) = (f64::from_le_bytes(a), f64::from_le_bytes(b));
                (if max { a.max(b) } else { a + b }).to_le_bytes()
            }),
            Elem::Bf16 => zip::<2>(dst, src, |a, b| {
                let (a, b) = (
                    bf16::from_le_bytes(a).to_f32(),
                    bf16::from_le_bytes(b).to_f32(),
                );
                bf16::from_f32(if max { a.max(b) } else { a + b }).to_le_bytes()
            }),
            Elem::F16 => zip::<2>(dst, src, |a, b| {
                let (a, b) = (
                    f16::from_le_bytes(a).to_f32(),
                    f16::from_le_bytes(b).to_f32(),
                );
                f16::from_f32(if max { a.max(b) } else { a + b }).to_le_bytes()
            }),
            Elem::I32 => zip::<4>(dst, src, |a, b| {
                let (a, b) = (i32::from_le_bytes(a), i32::from_le_bytes(b));
                (if max { a.max(b) } else { a.wrapping_add(b) }).to_le_bytes()
            }),
            Elem::I64 => zip::<8>(dst, src, |a, b| {
                let (a, b) = (i64::from_le_bytes(a), i64::from_le_bytes(b));
                (if max { a.max(b) } else { a.wrapping_add(b) }).to_le_bytes()
            }),
            Elem::U8 => zip::<1>(dst, src, |a, b| {
                [if max {
                    a[0].max(b[0])
                } else {
                    a[0].wrapping_add(b[0])
                }]
            }),
            Elem::I8 => zip::<1>(dst, src, |a, b| {
                let (a, b) = (a[0] as i8, b[0] as i8);
                [(if max { a.max(b) } else { a.wrapping_add(b) }) as u8]
            }),
        }
    }

    /// Divides every element by `n` (the last step of an average).
    pub(crate) fn scale_avg(self, buf: &mut [u8], n: usize) {
        let nf = n as f32;
        match self {
            Elem::F32 => map::<4>(buf, |a| (f32::from_le_bytes(a) / nf).to_le_bytes()),
            Elem::F64 => map::<8>(buf, |a| (f64::from_le_bytes(a) / n as f64).to_le_bytes()),
            Elem::Bf16 => map::<2>(buf, |a| {
                bf16::from_f32(bf16::from_le_bytes(a).to_f32() / nf).to_le_bytes()
            }),
            Elem::F16 => map::<2>(buf, |a| {
                f16::from_f32(f16::from_le_bytes(a).to_f32() / nf).to_le_bytes()
            }),
            Elem::I32 => map::<4>(buf, |a| (i32::from_le_bytes(a) / n as i32).to_le_bytes()),
            Elem::I64 => map::<8>(buf, |a| (i64::from_le_bytes(a) / n as i64).to_le_bytes()),
            Elem::U8 => map::<1>(buf, |a| [a[0] / n as u8]),
            Elem::I8 => map::<1>(buf, |a| [((a[0] as i8) / n as i8) as u8]),
        }
    }
}

#[inline]
fn map<const N: usize>(buf: &mut [u8], f: impl Fn([u8; N]) -> [u8; N]) {
    for d in buf.chunks_exact_mut(N) {
        let a: [u8; N] = (*d).try_into().unwrap_or([0; N]);
        d.copy_from_slice(&f(a));
    }
}

#[inline]
fn zip<const N: usize>(dst: &mut [u8], src: &[u8], f: impl Fn([u8; N], [u8; N]) -> [u8; N]) {
    for (d, s) in dst.chunks_exact_mut(N).zip(src.chunks_exact(N)) {
        let a: [u8; N] = (*d).try_into().unwrap_or([0; N]);
        let b: [u8; N] = s.try_into().unwrap_or([0; N]);
        d.copy_from_slice(&f(a, b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for n in [0usize, 1, 5, 7, 64, 1001] {
            for parts in 1..6 {
                let mut next = 0;
                for i in 0..parts {
                    let r = chunk_range(n, parts, i);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn reductions_follow_the_element_type() {
        let mut a: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        Elem::F32.reduce(ReduceOp::Sum, &mut a, &b);
        assert_eq!(&a[..4], &1.75f32.to_le_bytes());
        Elem::F32.reduce(ReduceOp::Max, &mut a, &b);
        assert_eq!(&a[4..], &3.0f32.to_le_bytes());
        let mut i: Vec<u8> = i64::MAX.to_le_bytes().to_vec();
        Elem::I64.reduce(ReduceOp::Sum, &mut i, &1i64.to_le_bytes());
        assert_eq!(i, i64::MIN.to_le_bytes());
        let mut h = bf16::from_f32(1.0).to_le_bytes().to_vec();
        Elem::Bf16.reduce(ReduceOp::Sum, &mut h, &bf16::from_f32(2.0).to_le_bytes());
        Elem::Bf16.scale_avg(&mut h, 2);
        assert_eq!(h, bf16::from_f32(1.5).to_le_bytes());
    }
}
