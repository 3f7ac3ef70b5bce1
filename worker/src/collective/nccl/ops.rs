//! Each collective of [`NcclComm`] as NCCL calls: whole-tensor all-reduce and broadcast,
//! in-place reduce-scatter and all-gather (grouped `ncclReduce`/`ncclBroadcast` per chunk when
//! the chunks are uneven), the barrier, and the deferred operations of data parallelism.

use std::ffi::c_int;

use cudarc::nccl::sys as ncsys;
use tch::{Kind, Tensor};

use super::ffi::{check, grouped, nccl_op};
use super::{NcclComm, Order};
use crate::collective::{chunk_range, Collective, CollectiveError, ReadyMarker, ReduceOp, Result};
use crate::cuda::Event;

impl NcclComm {
    fn all_reduce_ordered(&self, t: &Tensor, op: ReduceOp, order: Order) -> Result<()> {
        self.on_device("all_reduce", t, order, false, |inner, b| {
            // SAFETY: `b` is the live contiguous device memory of `count` elements of `dtype`
            // (in place is allowed); `comm` and the stream are live and the context current.
            let r = unsafe {
                (inner.api.all_reduce)(
                    b.ptr,
                    b.ptr,
                    b.count,
                    b.dtype,
                    nccl_op(op),
                    inner.comm,
                    inner.nccl_stream(),
                )
            };
            check(inner.api, "ncclAllReduce", r)
        })
    }

    fn reduce_scatter_ordered(&self, buf: &Tensor, op: ReduceOp, order: Order) -> Result<()> {
        let (n, rank) = (self.size, self.rank);
        self.on_device("reduce_scatter", buf, order, false, |inner, b| {
            if b.count % n == 0 {
                let count = b.count / n;
                // SAFETY: in place as NCCL defines it (`recvbuff == sendbuff + rank *
                // recvcount`), inside the `n * count` live elements of `b`.
                let r = unsafe {
                    (inner.api.reduce_scatter)(
                        b.ptr,
                        b.at(rank * count),
                        count,
                        b.dtype,
                        nccl_op(op),
                        inner.comm,
                        inner.nccl_stream(),
                    )
                };
                return check(inner.api, "ncclReduceScatter", r);
            }
            grouped(inner.api, || {
                for owner in 0..n {
                    let chunk = chunk_range(b.count, n, owner);
                    if chunk.is_empty() {
                        continue;
                    }
                    let p = b.at(chunk.start);
                    // SAFETY: the chunk lies inside the live elements of `b`; reduced in
                    // place onto its owner.
                    let r = unsafe {
                        (inner.api.reduce)(
                            p,
                            p,
                            chunk.len(),
                            b.dtype,
                            nccl_op(op),
                            owner as c_int,
                            inner.comm,
                            inner.nccl_stream(),
                        )
                    };
                    check(inner.api, "ncclReduce", r)?;
                }
                Ok(())
            })
        })
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_ordered(t, op, Order::NOW)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(CollectiveError::Invalid(format!(
                "broadcast from rank {root} in a group of {}",
                self.size
            )));
        }
        self.on_device("broadcast", t, Order::NOW, false, |inner, b| {
            // SAFETY: as in `all_reduce`; `root` is a rank of the group.
            let r = unsafe {
                (inner.api.broadcast)(
                    b.ptr,
                    b.ptr,
                    b.count,
                    b.dtype,
                    root as c_int,
                    inner.comm,
                    inner.nccl_stream(),
                )
            };
            check(inner.api, "ncclBroadcast", r)
        })
    }

    fn reduce_scatter_flat(&self, buf: &Tensor, op: ReduceOp) -> Result<()> {
        self.reduce_scatter_ordered(buf, op, Order::NOW)
    }

    fn all_gather_flat(&self, buf: &Tensor) -> Result<()> {
        let (n, rank) = (self.size, self.rank);
        self.on_device("all_gather", buf, Order::NOW, false, |inner, b| {
            if b.count % n == 0 {
                let count = b.count / n;
                // SAFETY: in place as NCCL defines it (`sendbuff == recvbuff + rank *
                // sendcount`), inside the `n * count` live elements of `b`.
                let r = unsafe {
                    (inner.api.all_gather)(
                        b.at(rank * count),
                        b.ptr,
                        count,
                        b.dtype,
                        inner.comm,
                        inner.nccl_stream(),
                    )
                };
                return check(inner.api, "ncclAllGather", r);
            }
            grouped(inner.api, || {
                for owner in 0..n {
                    let chunk = chunk_range(b.count, n, owner);
                    if chunk.is_empty() {
                        continue;
                    }
                    let p = b.at(chunk.start);
                    // SAFETY: the chunk lies inside the live elements of `b`; broadcast in
                    // place from its owner.
                    let r = unsafe {
                        (inner.api.broadcast)(
                            p,
                            p,
                            chunk.len(),
                            b.dtype,
                            owner as c_int,
                            inner.comm,
                            inner.nccl_stream(),
                        )
                    };
                    check(inner.api, "ncclBroadcast", r)?;
                }
                Ok(())
            })
        })
    }

    fn barrier(&self) -> Result<()> {
        let token = Tensor::zeros([1], (Kind::Int, self.device()));
        self.on_device("barrier", &token, Order::NOW, true, |inner, b| {
            // SAFETY: as in `all_reduce`, on the one-element `token`.
            let r = unsafe {
                (inner.api.all_reduce)(
                    b.ptr,
                    b.ptr,
                    b.count,
                    b.dtype,
                    ncsys::ncclRedOp_t::ncclSum,
                    inner.comm,
                    inner.nccl_stream(),
                )
            };
            check(inner.api, "ncclAllReduce", r)
        })
    }

    fn ready_marker(&self) -> Result<Option<ReadyMarker>> {
        // The context is `Sync`: no need to wait for the communication thread's lock.
        Event::on_compute(&self.ctx)
            .map(|e| Some(ReadyMarker(e)))
            .map_err(|e| CollectiveError::Nccl(format!("marking the compute stream: {e}")))
    }

    fn all_reduce_after(&self, t: &Tensor, op: ReduceOp, ready: Option<ReadyMarker>) -> Result<()> {
        let order = Order {
            after: ready,
            defer: true,
        };
        self.all_reduce_ordered(t, op, order)
    }

    fn reduce_scatter_flat_after(
        &self,
        buf: &Tensor,
        op: ReduceOp,
        ready: Option<ReadyMarker>,
    ) -> Result<()> {
        let order = Order {
            after: ready,
            defer: true,
        };
        self.reduce_scatter_ordered(buf, op, order)
    }

    fn wait_pending(&self) -> Result<()> {
        let mut inner = self.lock("wait_pending")?;
        if !inner.pending {
            return Ok(());
        }
        match inner.done.block_compute() {
            Ok(()) => {
                inner.pending = false;
                Ok(())
            }
            Err(e) => {
                let e = format!("wait_pending: ordering the compute stream after NCCL: {e}");
                inner.fail(&e);
                Err(CollectiveError::Nccl(e))
            }
        }
    }
}
