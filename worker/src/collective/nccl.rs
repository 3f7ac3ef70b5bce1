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
//! libtorch, as tch uses it, runs every kernel on the legacy default stream of the device.
//! Each communicator owns one non-blocking CUDA stream for its NCCL kernels, and every
//! operation is ordered against the default stream with two events:
//!
//! 1. `ready` is recorded on the default stream and the NCCL stream waits on it, so the
//!    collective sees every libtorch write issued before the call;
//! 2. the NCCL kernels are enqueued on the NCCL stream;
//! 3. `done` is recorded on the NCCL stream and the default stream waits on it, so every
//!    libtorch operation issued after the call (a read, a copy to the host, the caching
//!    allocator handing the memory to a new tensor) sees the result.
//!
//! Calls therefore return once the work is enqueued, not when it has finished; the tensor is
//! still ready for any later libtorch use. [`Collective::barrier`] waits on the host for its
//! all-reduce to finish, polling NCCL for asynchronous errors, and gives up after
//! `KILN_COLLECTIVE_TIMEOUT_S`.
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
//! All unsafe code of the NCCL backend lives in this module.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::marker::PhantomData;
use std::ptr;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cusys;
use cudarc::nccl::sys as ncsys;
use ncsys::ncclResult_t;
use tch::{Device, Kind, Tensor};

use super::tcp::collective_timeout;
use super::{chunk_range, Collective, CollectiveError, Elem, ReduceOp, Result};

pub mod library;

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
    inner: Mutex<Inner>,
}

/// The CUDA and NCCL handles of a communicator. Every use goes through the mutex of
/// [`NcclComm`].
struct Inner {
    api: &'static Api,
    device: cusys::CUdevice,
    /// The device's primary context (the one the CUDA runtime and libtorch use); retained.
    ctx: cusys::CUcontext,
    /// Null before initialization and after an abort.
    comm: ncsys::ncclComm_t,
    stream: cusys::CUstream,
    /// Recorded on the default stream before each collective.
    ready: cusys::CUevent,
    /// Recorded on the NCCL stream after each collective.
    done: cusys::CUevent,
    /// Why the communicator was aborted.
    failed: Option<String>,
}

// SAFETY: `Inner` holds handles, not thread-bound state. CUDA contexts, streams and events may
// be used from any thread (each use below makes the context current on the calling thread
// first). An NCCL communicator may be used from any thread as long as calls on it do not
// overlap; `Inner` is only reachable through the `Mutex` in `NcclComm`, which serializes
// them. `NcclComm` is then `Send` and `Sync` through `Mutex<Inner>`.
unsafe impl Send for Inner {}

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

/// The probe of the CUDA driver and NCCL, done once per process: NCCL's entry points, or why
/// the libraries cannot be used.
fn libraries() -> Result<&'static Api> {
    static DRIVER: OnceLock<Result<(), String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            std::panic::catch_unwind(|| {
                // SAFETY: `is_culib_present` only tries to open the driver library under its
                // candidate names and closes what it opened.
                if !unsafe { cusys::is_culib_present() } {
                    return Err("cannot load the CUDA driver library (libcuda.so.1): is an \
                         NVIDIA driver installed?"
                        .to_string());
                }
                cu::init().map_err(|e| format!("cuInit: {}", driver_text(e)))
            })
            .unwrap_or_else(|_| Err("loading the CUDA driver failed".to_string()))
        })
        .clone()
        .map_err(CollectiveError::Nccl)?;
    library::api().map_err(CollectiveError::Nccl)
}

/// Checks that the libraries load and that device `ordinal` exists; returns NCCL's entry
/// points.
fn prepare(ordinal: usize) -> Result<&'static Api> {
    let api = libraries()?;
    let count = cu::device::get_count()
        .map_err(|e| CollectiveError::Nccl(format!("cuDeviceGetCount: {}", driver_text(e))))?;
    if ordinal >= count.max(0) as usize {
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
        let (c_rank, c_size, c_ordinal) = (
            to_int(rank, "rank")?,
            to_int(size, "group size")?,
            to_int(device_ordinal, "device")?,
        );
        let api = prepare(device_ordinal)?;
        let fail = |what: &str, e: cu::DriverError| {
            CollectiveError::Nccl(format!("{what}: {}", driver_text(e)))
        };
        let device = cu::device::get(c_ordinal).map_err(|e| fail("cuDeviceGet", e))?;
        // SAFETY: `device` comes from `cuDeviceGet`; `Inner::drop` releases the reference.
        let ctx =
            unsafe { cu::primary_ctx::retain(device) }.map_err(|e| fail("retain context", e))?;
        // From here on, dropping `inner` frees whatever has been created.
        let mut inner = Inner {
            api,
            device,
            ctx,
            comm: ptr::null_mut(),
            stream: ptr::null_mut(),
            ready: ptr::null_mut(),
            done: ptr::null_mut(),
            failed: None,
        };
        {
            let _current = Current::push(ctx).map_err(CollectiveError::Nccl)?;
            inner.stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
                .map_err(|e| fail("cuStreamCreate", e))?;
            let flags = cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
            inner.ready = cu::event::create(flags).map_err(|e| fail("cuEventCreate", e))?;
            inner.done = cu::event::create(flags).map_err(|e| fail("cuEventCreate", e))?;
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
    /// contiguous), ordered against the default stream; with `wait`, also waits on the host
    /// for the work to finish.
    fn on_device(
        &self,
        name: &'static str,
        t: &Tensor,
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
            t.contiguous()
        };
        let buf = Buf {
            ptr: staged.data_ptr(),
            count: staged.numel(),
            dtype: nccl_type(elem),
            elem_size: elem.size(),
        };
        self.launch(name, wait, |inner| enqueue(inner, buf))?;
        if !contiguous {
            tch::no_grad(|| t.shallow_clone().copy_(&staged));
        }
        Ok(())
    }

    /// Enqueues one collective between the two stream-ordering events (see the module docs).
    /// Any failure aborts the communicator.
    fn launch(
        &self,
        name: &'static str,
        wait: bool,
        enqueue: impl FnOnce(&Inner) -> Result<(), String>,
    ) -> Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = &inner.failed {
            return Err(CollectiveError::Nccl(format!(
                "{name}: this communicator already failed ({why}); the job must restart"
            )));
        }
        let result = Current::push(inner.ctx).and_then(|_current| {
            inner.check_async()?;
            let legacy = cu::stream::null();
            let no_flags = cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT;
            // SAFETY: `ready` and `stream` were created in this context, which is current, and
            // live as long as `inner`; the null stream is the legacy default stream.
            unsafe {
                cu::event::record(inner.ready, legacy)
                    .and_then(|_| cu::stream::wait_event(inner.stream, inner.ready, no_flags))
            }
            .map_err(|e| format!("ordering after the default stream: {}", driver_text(e)))?;
            enqueue(&inner)?;
            // SAFETY: as above, for `done`.
            unsafe {
                cu::event::record(inner.done, inner.stream)
                    .and_then(|_| cu::stream::wait_event(legacy, inner.done, no_flags))
            }
            .map_err(|e| format!("ordering the default stream after NCCL: {}", driver_text(e)))?;
            if wait {
                inner.wait(self.timeout)?;
            }
            Ok(())
        });
        result.map_err(|e| {
            let e = format!("{name}: {e}");
            inner.fail(&e);
            CollectiveError::Nccl(e)
        })
    }
}

impl Inner {
    fn nccl_stream(&self) -> ncsys::cudaStream_t {
        self.stream.cast()
    }

    /// An error NCCL found in the background (a lost peer, a failed kernel).
    fn check_async(&self) -> Result<(), String> {
        let mut state = ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is a live communicator (callers check `failed`, and only `fail` and
        // `drop` clear it) and `state` a valid out pointer.
        let status = unsafe { (self.api.comm_get_async_error)(self.comm, &mut state) };
        check(self.api, "ncclCommGetAsyncError", status)?;
        match state {
            ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => Ok(()),
            other => Err(format!(
                "asynchronous NCCL error: {}",
                nccl_text(self.api, other)
            )),
        }
    }

    /// Waits on the host until the last collective has finished, for at most `timeout`.
    /// The context must be current.
    fn wait(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            // SAFETY: `done` is a live event of this context.
            match unsafe { cu::event::query(self.done) } {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == cusys::CUresult::CUDA_ERROR_NOT_READY => {}
                Err(e) => return Err(format!("waiting for NCCL: {}", driver_text(e))),
            }
            self.check_async()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "waited {} s for the other ranks; one of them is hung, dead or far behind \
                     (set KILN_COLLECTIVE_TIMEOUT_S to wait longer)",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Aborts the communicator after an error; later calls fail with `why`.
    fn fail(&mut self, why: &str) {
        if !self.comm.is_null() {
            let _current = Current::push(self.ctx);
            // SAFETY: `comm` is live and never used after this: it is cleared below.
            let _ = unsafe { (self.api.comm_abort)(self.comm) };
            self.comm = ptr::null_mut();
        }
        self.failed = Some(why.to_owned());
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let current = Current::push(self.ctx);
        if !self.comm.is_null() {
            // Let the collectives already enqueued finish before freeing the communicator;
            // abort instead when they cannot.
            let finished = current.is_ok() && self.wait(collective_timeout()).is_ok();
            // SAFETY: `comm` is live and not used after this.
            let _ = unsafe {
                if finished {
                    (self.api.comm_destroy)(self.comm)
                } else {
                    (self.api.comm_abort)(self.comm)
                }
            };
            self.comm = ptr::null_mut();
        }
        // SAFETY: the events and the stream were created in this context, are not null, and
        // nothing uses them after this; CUDA frees them once pending work completes.
        unsafe {
            for event in [self.ready, self.done] {
                if !event.is_null() {
                    let _ = cu::event::destroy(event);
                }
            }
            if !self.stream.is_null() {
                let _ = cu::stream::destroy(self.stream);
            }
        }
        drop(current);
        // SAFETY: balances the `primary_ctx::retain` of `NcclComm::new` on the same device.
        let _ = unsafe { cu::primary_ctx::release(self.device) };
    }
}

/// Makes a context current on this thread until dropped (push and pop, so the thread's own
/// current context, if any, comes back).
struct Current(PhantomData<*const ()>);

impl Current {
    fn push(ctx: cusys::CUcontext) -> Result<Current, String> {
        // SAFETY: `ctx` is the primary context retained by the communicator, alive as long as
        // it is.
        unsafe { cusys::cuCtxPushCurrent_v2(ctx) }
            .result()
            .map_err(|e| format!("cuCtxPushCurrent: {}", driver_text(e)))?;
        Ok(Current(PhantomData))
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        let mut popped = ptr::null_mut();
        // SAFETY: pops the context `push` pushed on this thread (`Current` is not `Send`);
        // `popped` is a valid out pointer.
        let _ = unsafe { cusys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

fn nccl_type(elem: Elem) -> ncsys::ncclDataType_t {
    use ncsys::ncclDataType_t as T;
    match elem {
        Elem::F32 => T::ncclFloat32,
        Elem::F64 => T::ncclFloat64,
        Elem::Bf16 => T::ncclBfloat16,
        Elem::F16 => T::ncclFloat16,
        Elem::I32 => T::ncclInt32,
        Elem::I64 => T::ncclInt64,
        Elem::U8 => T::ncclUint8,
        Elem::I8 => T::ncclInt8,
    }
}

/// `ncclAvg` is the average [`ReduceOp::Avg`] asks for: integers are summed, then divided by
/// the group size with truncation; floats are scaled by `1 / size` before the sum, which can
/// round differently in the last place from dividing the sum.
fn nccl_op(op: ReduceOp) -> ncsys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncsys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => ncsys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => ncsys::ncclRedOp_t::ncclMax,
    }
}

/// NCCL's text for an error, with the detail of the last failure when NCCL has one.
fn nccl_text(api: &Api, e: ncclResult_t) -> String {
    // SAFETY: `ncclGetErrorString` returns a static NUL-terminated string for every code.
    let base = unsafe {
        let p = (api.get_error_string)(e);
        if p.is_null() {
            format!("{e:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    // SAFETY: `ncclGetLastError` ignores its argument and returns NUL-terminated text (or
    // null), valid until the next NCCL call; it is copied at once.
    let last = unsafe {
        let p = (api.get_last_error)(ptr::null_mut());
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    if last.trim().is_empty() {
        base
    } else {
        format!("{base}: {}", last.trim())
    }
}

fn driver_text(e: cu::DriverError) -> String {
    match e.error_string() {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => format!("{:?}", e.0),
    }
}

/// `Ok` for a call that succeeded (or is in progress, for non-blocking communicators),
/// else NCCL's text for the failure of `what`.
fn check(api: &Api, what: &str, status: ncclResult_t) -> Result<(), String> {
    match status {
        ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => Ok(()),
        e => Err(format!("{what}: {}", nccl_text(api, e))),
    }
}

/// Runs `body` between `ncclGroupStart` and `ncclGroupEnd` (ended even when `body` fails).
fn grouped(api: &Api, body: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    // SAFETY: group calls take no arguments; they only mark a group on this thread.
    check(api, "ncclGroupStart", unsafe { (api.group_start)() })?;
    let enqueued = body();
    // SAFETY: as above; closes the group opened here.
    let ended = check(api, "ncclGroupEnd", unsafe { (api.group_end)() });
    enqueued.and(ended)
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
                &format_args!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100),
            )
            .finish()
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
        self.on_device("all_reduce", t, false, |inner, b| {
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

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(CollectiveError::Invalid(format!(
                "broadcast from rank {root} in a group of {}",
                self.size
            )));
        }
        self.on_device("broadcast", t, false, |inner, b| {
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
        let (n, rank) = (self.size, self.rank);
        self.on_device("reduce_scatter", buf, false, |inner, b| {
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

    fn all_gather_flat(&self, buf: &Tensor) -> Result<()> {
        let (n, rank) = (self.size, self.rank);
        self.on_device("all_gather", buf, false, |inner, b| {
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
        self.on_device("barrier", &token, true, |inner, b| {
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
}
