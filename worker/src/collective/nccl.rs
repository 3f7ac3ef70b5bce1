//! Collectives on CUDA tensors through NCCL.
//!
//! NCCL and the CUDA driver are loaded at run time: the binary builds and runs without CUDA,
//! and nothing here touches either library until [`NcclComm::available`],
//! [`NcclComm::unique_id`], [`nccl_version`], [`nccl_library`] or a constructor is called.
//! Kiln loads NCCL itself ([`library`]: `KILN_NCCL_LIBRARY`, then `libnccl.so.2` and
//! `libnccl.so` by name, then the torch wheel's NCCL beside the loaded libtorch) and reaches
//! the CUDA driver through `cudarc`, which panics when `libcuda` is missing, so every entry
//! point checks that both load before any other call and turns a missing library into an
//! error.
//!
//! # Bootstrap
//!
//! All ranks of a communicator share one 128-byte NCCL unique id created by rank 0.
//! [`NcclComm::from_tcp`] carries it over another [`Collective`] (normally a
//! [`TcpRing`](super::tcp::TcpRing) over the same ranks), then checks that every rank can
//! start NCCL before any of them blocks in `ncclCommInitRank`.
//!
//! # Stream ordering
//!
//! libtorch, as tch uses it, runs every kernel on the legacy default stream of the device:
//! the compute stream. Each communicator owns one non-blocking CUDA stream for its NCCL
//! kernels (in order: each collective starts after the previous one), and every operation is
//! ordered against the compute stream with events ([`crate::cuda`]).
//!
//! Plain operations ([`Collective::all_reduce`] and the others) are ordered at the call:
//!
//! 1. `ready` is recorded on the compute stream and the NCCL stream waits on it, so the
//!    collective sees every libtorch write issued before the call;
//! 2. the NCCL kernels are enqueued on the NCCL stream;
//! 3. `done` is recorded on the NCCL stream and the compute stream waits on it, so every
//!    libtorch operation issued after the call (a read, a copy to the host, the caching
//!    allocator handing the memory to a new tensor) sees the result.
//!
//! Deferred operations, which data parallelism uses for its gradient buckets, split that
//! protocol between two threads:
//!
//! 1. the training thread calls [`Collective::ready_marker`] the moment a bucket's last
//!    gradient has been enqueued: a fresh event recorded on the compute stream, handed to the
//!    communication thread with the bucket;
//! 2. the communication thread calls [`Collective::all_reduce_after`] (or
//!    [`Collective::reduce_scatter_flat_after`]) with it: the NCCL stream waits on the marker,
//!    not on the compute stream's state at the call, so later backward kernels do not delay
//!    the bucket; the NCCL kernels are enqueued and `done` is recorded after them, but the
//!    compute stream does not wait: the collective overlaps the rest of backward;
//! 3. the training thread calls [`Collective::wait_pending`] before it reads the results (the
//!    gradient norm, the optimizer): the compute stream waits on `done`, whose last recording
//!    follows every collective enqueued before it on the in-order NCCL stream.
//!
//! Between 2 and 3 the caller must not touch the bucket's memory on the compute stream, nor
//! free it (the gradient buffer lives as long as the model). A plain operation issued in that
//! window also makes the compute stream wait for the deferred ones (its `done` follows them).
//! A deferred operation on a non-contiguous tensor goes through a staging copy on the compute
//! stream and is therefore not deferred: the compute stream waits for it at once.
//!
//! Calls return once the work is enqueued, not when it has finished. [`Collective::barrier`]
//! waits on the host for its all-reduce to finish, polling NCCL for asynchronous errors, and
//! gives up after `KILN_COLLECTIVE_TIMEOUT_S`.
//!
//! # Uneven chunks
//!
//! NCCL's reduce-scatter and all-gather need equal chunks. When the buffer divides evenly they
//! run in place; otherwise the flat operations become one grouped `ncclReduce` per chunk to
//! the chunk's owner, or one grouped `ncclBroadcast` per chunk from its owner, which gives
//! exactly the chunks [`chunk_range`] defines.
//!
//! # Failures
//!
//! An NCCL or CUDA error aborts the communicator (`ncclCommAbort`): later calls return an
//! error, as a failed [`TcpRing`](super::tcp::TcpRing) does, and the job must restart.
//!
//! All unsafe code of the NCCL backend lives in this module and its submodules: [`library`]
//! (loading NCCL), `handles` (a communicator's CUDA and NCCL handles: waiting, aborting,
//! freeing), `ffi` (Kiln's values as NCCL's, NCCL's results as errors) and `ops` (each
//! collective's NCCL calls).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void};
use std::fmt;
use std::ptr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cudarc::nccl::sys as ncsys;
use tch::{Device, Tensor};

use super::tcp::collective_timeout;
use super::{Collective, CollectiveError, Elem, ReadyMarker, ReduceOp, Result};
use crate::cuda::{self, Context, Event, Stream};

mod ffi;
mod handles;
pub mod library;
mod ops;

use ffi::{check, nccl_type};
use handles::Inner;
use library::Api;

/// The version of the NCCL library this process uses (e.g. 22809 for 2.28.9), loading NCCL
/// alone: no CUDA driver or device is needed.
pub fn nccl_version() -> Result<i32> {
    nccl_library().map(|(_, version)| version)
}

/// The NCCL library file this process loaded (as the dynamic loader opened it) and its
/// version, loading it if need be (see [`library`] for where Kiln looks). No CUDA driver or
/// device is needed.
pub fn nccl_library() -> Result<(std::path::PathBuf, i32), CollectiveError> {
    library::api()
        .map(|api| (api.path.clone(), api.version))
        .map_err(CollectiveError::Nccl)
}

/// An NCCL communicator for CUDA tensors on one device.
pub struct NcclComm {
    api: &'static Api,
    rank: usize,
    size: usize,
    ordinal: usize,
    timeout: Duration,
    /// The device's primary context (the one the CUDA runtime and libtorch use); retained.
    ctx: Arc<Context>,
    inner: Mutex<Inner>,
}

/// How one collective is ordered against the compute stream (see the module docs).
struct Order {
    /// The compute-stream point the collective runs after; `None`: the point of the call.
    after: Option<ReadyMarker>,
    /// Leave the compute stream free until `wait_pending`.
    defer: bool,
}

impl Order {
    const NOW: Order = Order {
        after: None,
        defer: false,
    };
}

/// A device buffer as NCCL takes it.
#[derive(Clone, Copy)]
struct Buf {
    ptr: *mut c_void,
    count: usize,
    dtype: ncsys::ncclDataType_t,
    elem_size: usize,
}

impl Buf {
    /// The buffer from element `start` on (pointer arithmetic only, no access).
    fn at(&self, start: usize) -> *mut c_void {
        self.ptr
            .cast::<u8>()
            .wrapping_add(start * self.elem_size)
            .cast()
    }
}

/// The CUDA driver and NCCL, each probed once per process: NCCL's entry points, or why the
/// libraries cannot be used.
fn libraries() -> Result<&'static Api> {
    cuda::driver().map_err(CollectiveError::Nccl)?;
    library::api().map_err(CollectiveError::Nccl)
}

/// Checks that the libraries load and that device `ordinal` exists; returns NCCL's entry
/// points.
fn prepare(ordinal: usize) -> Result<&'static Api> {
    let api = libraries()?;
    let count = cuda::device_count().map_err(CollectiveError::Nccl)?;
    if ordinal >= count {
        return Err(CollectiveError::Nccl(format!(
            "CUDA device {ordinal} does not exist: this machine has {count}"
        )));
    }
    Ok(api)
}

impl NcclComm {
    /// Whether NCCL collectives can run here: libtorch sees a CUDA device and the CUDA driver
    /// and NCCL libraries load. Never panics; on a machine without CUDA it loads nothing.
    pub fn available() -> bool {
        tch::Cuda::is_available() && prepare(0).is_ok()
    }

    /// A fresh NCCL unique id, to be shared with every rank of a new communicator.
    pub fn unique_id() -> Result<[u8; 128]> {
        let api = libraries()?;
        let mut id = ncsys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid out pointer.
        check(api, "ncclGetUniqueId", unsafe {
            (api.get_unique_id)(&mut id)
        })
        .map_err(CollectiveError::Nccl)?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Joins communicator `unique_id` as `rank` of `size`, on CUDA device `device_ordinal`.
    /// Blocks until every rank has joined.
    pub fn new(
        rank: usize,
        size: usize,
        unique_id: [u8; 128],
        device_ordinal: usize,
    ) -> Result<Self> {
        if rank >= size {
            return Err(CollectiveError::Invalid(format!(
                "NCCL rank {rank} is outside a group of {size}"
            )));
        }
        let to_int = |v: usize, what: &str| {
            c_int::try_from(v)
                .map_err(|_| CollectiveError::Invalid(format!("NCCL {what} {v} is too large")))
        };
        let (c_rank, c_size) = (to_int(rank, "rank")?, to_int(size, "group size")?);
        let api = prepare(device_ordinal)?;
        // Whatever is created is freed when dropped, should a later step fail.
        let ctx = Context::retain(device_ordinal).map_err(CollectiveError::Nccl)?;
        let stream = Stream::new(&ctx).map_err(CollectiveError::Nccl)?;
        let ready = Event::new(&ctx).map_err(CollectiveError::Nccl)?;
        let done = Event::new(&ctx).map_err(CollectiveError::Nccl)?;
        let mut inner = Inner {
            api,
            ctx: ctx.clone(),
            comm: ptr::null_mut(),
            stream,
            ready,
            done,
            pending: false,
            failed: None,
        };
        {
            let _current = ctx.current().map_err(CollectiveError::Nccl)?;
            let id = ncsys::ncclUniqueId {
                internal: unique_id.map(|b| b as c_char),
            };
            let mut comm = ptr::null_mut();
            // SAFETY: `comm` is a valid out pointer; the context of `device_ordinal` is current,
            // which is how NCCL picks the communicator's device.
            let status = unsafe { (api.comm_init_rank)(&mut comm, c_size, id, c_rank) };
            check(api, "ncclCommInitRank", status)
                .map_err(|e| CollectiveError::Nccl(format!("rank {rank} of {size}: {e}")))?;
            inner.comm = comm;
        }
        Ok(NcclComm {
            api,
            rank,
            size,
            ordinal: device_ordinal,
            timeout: collective_timeout(),
            ctx,
            inner: Mutex::new(inner),
        })
    }

    /// Forms a communicator over the ranks of `bootstrap` (same ranks, same order) on CUDA
    /// device `device_ordinal`: rank 0 creates the unique id and broadcasts it over
    /// `bootstrap`, then every rank checks that it can start NCCL before all of them join.
    /// Every rank of `bootstrap` must call this.
    pub fn from_tcp(bootstrap: &dyn Collective, device_ordinal: usize) -> Result<Self> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        // Byte 0 says whether rank 0 has an id; the id follows.
        let mut msg = [0u8; 129];
        let mut root_error = None;
        if rank == 0 {
            match Self::unique_id() {
                Ok(id) => {
                    msg[0] = 1;
                    msg[1..].copy_from_slice(&id);
                }
                Err(e) => root_error = Some(e),
            }
        }
        let t = Tensor::from_slice(&msg);
        bootstrap.broadcast(&t, 0)?;
        let got = Vec::<u8>::try_from(&t)
            .map_err(|e| CollectiveError::Invalid(format!("reading the NCCL unique id: {e}")))?;
        if got.first() != Some(&1) || got.len() != 129 {
            return Err(root_error.unwrap_or_else(|| {
                CollectiveError::Nccl(
                    "rank 0 could not create an NCCL unique id (see its log)".into(),
                )
            }));
        }
        let mut id = [0u8; 128];
        id.copy_from_slice(&got[1..]);
        // A rank that cannot start NCCL says so before the others block in the init.
        let local = prepare(device_ordinal);
        let flag = Tensor::from_slice(&[i32::from(local.is_err())]);
        bootstrap.all_reduce(&flag, ReduceOp::Max)?;
        local?;
        if flag.int64_value(&[0]) != 0 {
            return Err(CollectiveError::Nccl(
                "another rank of the group cannot start NCCL (see its log)".into(),
            ));
        }
        Self::new(rank, size, id, device_ordinal)
    }

    /// The CUDA device this communicator runs on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// Runs `enqueue` on the contiguous memory of `t` (a staging copy when `t` is not
    /// contiguous), ordered against the compute stream as `order` says; with `wait`, also
    /// waits on the host for the work to finish.
    fn on_device(
        &self,
        name: &'static str,
        t: &Tensor,
        mut order: Order,
        wait: bool,
        enqueue: impl FnOnce(&Inner, Buf) -> Result<(), String>,
    ) -> Result<()> {
        let elem = Elem::of(t.kind())?;
        match t.device() {
            Device::Cuda(i) if i == self.ordinal => {}
            other => {
                return Err(CollectiveError::Invalid(format!(
                    "{name}: this NCCL communicator works on CUDA tensors of {:?}, got a tensor \
                     on {other:?} (CPU tensors go through the TCP backend)",
                    self.device()
                )))
            }
        }
        if t.numel() == 0 {
            return Ok(());
        }
        let contiguous = t.is_contiguous();
        let staged = if contiguous {
            t.shallow_clone()
        } else {
            // The staging copy is written and read back on the compute stream, and freed
            // after this call: the compute stream must wait for the collective at once.
            order.defer = false;
            t.contiguous()
        };
        let buf = Buf {
            ptr: staged.data_ptr(),
            count: staged.numel(),
            dtype: nccl_type(elem),
            elem_size: elem.size(),
        };
        self.launch(name, order, wait, |inner| enqueue(inner, buf))?;
        if !contiguous {
            tch::no_grad(|| t.shallow_clone().copy_(&staged));
        }
        Ok(())
    }

    /// Enqueues one collective between the stream-ordering events `order` asks for (see the
    /// module docs). Any failure aborts the communicator.
    fn launch(
        &self,
        name: &'static str,
        order: Order,
        wait: bool,
        enqueue: impl FnOnce(&Inner) -> Result<(), String>,
    ) -> Result<()> {
        let mut inner = self.lock(name)?;
        let ctx = inner.ctx.clone();
        let run = || -> Result<(), String> {
            let _current = ctx.current()?;
            inner.check_async()?;
            match &order.after {
                Some(ReadyMarker(marker)) => inner.stream.wait(marker),
                None => inner
                    .ready
                    .record(None)
                    .and_then(|()| inner.stream.wait(&inner.ready)),
            }
            .map_err(|e| format!("ordering after the compute stream: {e}"))?;
            enqueue(&inner)?;
            inner
                .done
                .record(Some(&inner.stream))
                .map_err(|e| format!("marking the end of the collective: {e}"))?;
            if order.defer {
                inner.pending = true;
            } else {
                inner
                    .done
                    .block_compute()
                    .map_err(|e| format!("ordering the compute stream after NCCL: {e}"))?;
                // `done` follows every collective enqueued before this one.
                inner.pending = false;
            }
            if wait {
                inner.wait(self.timeout)?;
            }
            Ok(())
        };
        let result = run();
        result.map_err(|e| {
            let e = format!("{name}: {e}");
            inner.fail(&e);
            CollectiveError::Nccl(e)
        })
    }

    /// The communicator's state, unless it already failed.
    fn lock(&self, name: &str) -> Result<std::sync::MutexGuard<'_, Inner>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &inner.failed {
            return Err(CollectiveError::Nccl(format!(
                "{name}: this communicator already failed ({why}); the job must restart"
            )));
        }
        Ok(inner)
    }
}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.api.version;
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("device", &self.device())
            .field(
                "nccl",
                &format_args!("{}", crate::device::dotted_version(v)),
            )
            .finish()
    }
}
