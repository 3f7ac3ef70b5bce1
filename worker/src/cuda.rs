//! CUDA driver helpers shared by the NCCL backend ([`crate::collective::nccl`]) and the
//! checkpoint copy ([`crate::checkpoint`]): a device's primary context made current for a
//! scope, non-blocking streams and events as owned handles, and waits of the compute stream.
//!
//! libtorch, as tch uses it, runs every kernel on the legacy default stream of its device:
//! that stream is "the compute stream" here. Work Kiln puts on streams of its own (NCCL's,
//! the checkpoint copy's) is ordered against it with events only: a stream waits on an event
//! recorded on the other (a device-side wait; the host does not block).
//!
//! The driver is reached through `cudarc`, loaded at run time. `cudarc` panics when
//! `libcuda.so.1` is missing, so every entry point goes through [`driver`] first, which checks
//! that it loads and turns a missing driver into an error. All unsafe code of these helpers
//! lives in this module.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::marker::PhantomData;
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cusys;
use tch::{Device, Tensor};

/// Loads the CUDA driver and initializes it, once per process; the error says why it cannot
/// be used.
pub(crate) fn driver() -> Result<(), String> {
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
}

/// The driver's text for an error.
pub(crate) fn driver_text(e: cu::DriverError) -> String {
    match e.error_string() {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => format!("{:?}", e.0),
    }
}

/// The driver's version and its devices, for `kiln doctor`.
#[derive(Debug, Clone)]
pub struct DriverInfo {
    /// The CUDA version the driver supports, e.g. `13.0`.
    pub version: String,
    /// Each device's name and bytes of memory.
    pub devices: Vec<(String, u64)>,
}

/// Reads the driver's version and its devices' names and memory.
pub fn driver_info() -> Result<DriverInfo, String> {
    driver()?;
    let mut v = 0;
    // SAFETY: the driver is loaded (`driver`); `v` is a valid out pointer.
    unsafe { cusys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| format!("cuDriverGetVersion: {}", driver_text(e)))?;
    let mut devices = Vec::new();
    for i in 0..device_count()? {
        let d =
            cu::device::get(i as i32).map_err(|e| format!("cuDeviceGet: {}", driver_text(e)))?;
        let name =
            cu::device::get_name(d).map_err(|e| format!("cuDeviceGetName: {}", driver_text(e)))?;
        // SAFETY: `d` is a device handle from `cuDeviceGet`.
        let mem = unsafe { cu::device::total_mem(d) }
            .map_err(|e| format!("cuDeviceTotalMem: {}", driver_text(e)))?;
        devices.push((name, mem as u64));
    }
    Ok(DriverInfo {
        version: format!("{}.{}", v / 1000, v % 1000 / 10),
        devices,
    })
}

/// The number of CUDA devices the driver sees.
pub(crate) fn device_count() -> Result<usize, String> {
    driver()?;
    cu::device::get_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("cuDeviceGetCount: {}", driver_text(e)))
}

/// The primary context of one device (the one the CUDA runtime, hence libtorch, uses),
/// retained while this lives.
pub(crate) struct Context {
    ordinal: usize,
    device: cusys::CUdevice,
    raw: cusys::CUcontext,
}

// SAFETY: a CUDA context is a process-wide handle that may be made current on any thread;
// `Context` only holds it and releases it once, on drop.
unsafe impl Send for Context {}
// SAFETY: as above: every use makes the context current on the calling thread first.
unsafe impl Sync for Context {}

impl Context {
    /// Retains the primary context of device `ordinal`.
    pub(crate) fn retain(ordinal: usize) -> Result<Arc<Context>, String> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(format!(
                "CUDA device {ordinal} does not exist: this machine has {count}"
            ));
        }
        let c_ordinal = i32::try_from(ordinal).map_err(|_| format!("device {ordinal}"))?;
        let device =
            cu::device::get(c_ordinal).map_err(|e| format!("cuDeviceGet: {}", driver_text(e)))?;
        // SAFETY: `device` comes from `cuDeviceGet`; `drop` releases the reference.
        let raw = unsafe { cu::primary_ctx::retain(device) }
            .map_err(|e| format!("retaining the primary context: {}", driver_text(e)))?;
        Ok(Arc::new(Context {
            ordinal,
            device,
            raw,
        }))
    }

    /// The primary context of `ordinal`, retained once for the life of the process.
    pub(crate) fn primary(ordinal: usize) -> Result<Arc<Context>, String> {
        static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<Context>>>> = OnceLock::new();
        let mut map = CONTEXTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(&ordinal) {
            return Ok(c.clone());
        }
        let c = Context::retain(ordinal)?;
        map.insert(ordinal, c.clone());
        Ok(c)
    }

    /// Makes this context current on the calling thread until the guard drops.
    pub(crate) fn current(&self) -> Result<Current<'_>, String> {
        // SAFETY: `raw` is the retained primary context, alive as long as `self`.
        unsafe { cusys::cuCtxPushCurrent_v2(self.raw) }
            .result()
            .map_err(|e| format!("cuCtxPushCurrent: {}", driver_text(e)))?;
        Ok(Current(PhantomData))
    }

    /// Blocks the host until the compute stream (the legacy default stream) has finished
    /// everything enqueued on it, leaving Kiln's own streams running.
    pub(crate) fn sync_compute(&self) -> Result<(), String> {
        let _current = self.current()?;
        // SAFETY: the null stream is the legacy default stream of the current context.
        unsafe { cu::stream::synchronize(cu::stream::null()) }
            .map_err(|e| format!("cuStreamSynchronize: {}", driver_text(e)))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the `primary_ctx::retain` of `Context::retain` on the same device.
        let _ = unsafe { cu::primary_ctx::release(self.device) };
    }
}

/// A context pushed on this thread's context stack until dropped (push and pop, so the
/// thread's own current context, if any, comes back). Not `Send`: it must pop on the thread
/// that pushed.
pub(crate) struct Current<'a>(PhantomData<(*const (), &'a Context)>);

impl Drop for Current<'_> {
    fn drop(&mut self) {
        let mut popped = ptr::null_mut();
        // SAFETY: pops the context `Context::current` pushed on this thread; `popped` is a
        // valid out pointer.
        let _ = unsafe { cusys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

/// A non-blocking stream of one context: it never synchronizes implicitly with the compute
/// stream, only through events.
pub(crate) struct Stream {
    raw: cusys::CUstream,
    ctx: Arc<Context>,
}

// SAFETY: a stream handle may be used from any thread once its context is current, which
// every method below makes it; the handle is destroyed once, on drop.
unsafe impl Send for Stream {}
// SAFETY: as above; enqueueing on one stream from several threads is allowed by CUDA (the
// order between threads is then whatever the callers' order is).
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Stream, String> {
        let _current = ctx.current()?;
        let raw = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| format!("cuStreamCreate: {}", driver_text(e)))?;
        Ok(Stream {
            raw,
            ctx: ctx.clone(),
        })
    }

    pub(crate) fn raw(&self) -> cusys::CUstream {
        self.raw
    }

    /// Work enqueued on this stream from now on runs after `event`'s recorded point.
    pub(crate) fn wait(&self, event: &Event) -> Result<(), String> {
        let _current = self.ctx.current()?;
        wait_event(self.raw, event)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _current = self.ctx.current();
        // SAFETY: the stream was created in this context and nothing uses it after this;
        // CUDA lets work already enqueued finish before freeing it.
        let _ = unsafe { cu::stream::destroy(self.raw) };
    }
}

/// An event (without timing) of one context: a point on a stream that other streams, or the
/// host, can wait for.
pub(crate) struct Event {
    raw: cusys::CUevent,
    ctx: Arc<Context>,
}

// SAFETY: as for `Stream`: an event handle may be recorded, waited on and queried from any
// thread with its context current, which every method makes it.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Event, String> {
        let _current = ctx.current()?;
        let raw = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| format!("cuEventCreate: {}", driver_text(e)))?;
        Ok(Event {
            raw,
            ctx: ctx.clone(),
        })
    }

    /// Records the current end of `stream` (the compute stream when `None`).
    pub(crate) fn record(&self, stream: Option<&Stream>) -> Result<(), String> {
        let _current = self.ctx.current()?;
        let s = stream.map_or(cu::stream::null(), Stream::raw);
        // SAFETY: the event and the stream belong to the current context; the null stream is
        // its legacy default stream.
        unsafe { cu::event::record(self.raw, s) }
            .map_err(|e| format!("cuEventRecord: {}", driver_text(e)))
    }

    /// An event recorded now on the compute stream of `ctx`.
    pub(crate) fn on_compute(ctx: &Arc<Context>) -> Result<Event, String> {
        let e = Event::new(ctx)?;
        e.record(None)?;
        Ok(e)
    }

    /// Whether the recorded work has finished (never blocks).
    pub(crate) fn done(&self) -> Result<bool, String> {
        let _current = self.ctx.current()?;
        // SAFETY: a live event of the current context.
        match unsafe { cu::event::query(self.raw) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == cusys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(format!("cuEventQuery: {}", driver_text(e))),
        }
    }

    /// Blocks the host until the recorded work has finished.
    pub(crate) fn synchronize(&self) -> Result<(), String> {
        let _current = self.ctx.current()?;
        // SAFETY: a live event of the current context.
        unsafe { cu::event::synchronize(self.raw) }
            .map_err(|e| format!("cuEventSynchronize: {}", driver_text(e)))
    }

    /// Makes the compute stream wait, on the device, for the recorded work.
    pub(crate) fn block_compute(&self) -> Result<(), String> {
        let _current = self.ctx.current()?;
        wait_event(cu::stream::null(), self)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _current = self.ctx.current();
        // SAFETY: created in this context and not used after this; CUDA frees it once any
        // stream waiting on it has passed the wait.
        let _ = unsafe { cu::event::destroy(self.raw) };
    }
}

/// One device-to-host copy: elements `src_at..src_at + len` of a device tensor into elements
/// `dst_at..` of a page-locked host tensor of the same kind.
pub(crate) struct ToHost<'a> {
    pub src: &'a Tensor,
    pub src_at: i64,
    pub dst: &'a Tensor,
    pub dst_at: i64,
    pub len: i64,
}

/// Device-to-host copies in flight on a stream. It owns (shallow clones of) every tensor
/// involved, so none is freed before the copies finish: dropping it waits for them. The
/// destinations hold the copied values once [`HostCopy::wait`] has returned.
pub(crate) struct HostCopy {
    done: Event,
    /// Held, never used (a `Mutex` makes the copy shareable between threads).
    _tensors: Mutex<Vec<Tensor>>,
}

impl HostCopy {
    /// Enqueues `copies` on `stream` after the point `after` recorded, and an event after
    /// them. Every source must be a contiguous tensor on the stream's device, every
    /// destination a contiguous page-locked CPU tensor of the same kind, every range inside
    /// its tensor.
    pub(crate) fn start(
        stream: &Stream,
        after: &Event,
        copies: &[ToHost<'_>],
    ) -> Result<HostCopy, String> {
        let ctx = &stream.ctx;
        let device = Device::Cuda(ctx.ordinal);
        for (i, c) in copies.iter().enumerate() {
            let inside =
                |t: &Tensor, at: i64| at >= 0 && c.len >= 0 && at + c.len <= t.numel() as i64;
            if c.src.device() != device
                || c.dst.device() != Device::Cpu
                || c.src.kind() != c.dst.kind()
                || !c.src.is_contiguous()
                || !c.dst.is_contiguous()
                || !c.dst.f_is_pinned(device).unwrap_or(false)
                || !inside(c.src, c.src_at)
                || !inside(c.dst, c.dst_at)
            {
                return Err(format!(
                    "copy {i} is not from a contiguous tensor on {device:?} into a page-locked \
                     host tensor of the same kind, within both"
                ));
            }
        }
        let copy = HostCopy {
            done: Event::new(ctx)?,
            _tensors: Mutex::new(
                copies
                    .iter()
                    .flat_map(|c| [c.src.shallow_clone(), c.dst.shallow_clone()])
                    .collect(),
            ),
        };
        let _current = ctx.current()?;
        let mut enqueued = wait_event(stream.raw, after);
        for c in copies {
            if enqueued.is_err() {
                break;
            }
            let size = c.src.kind().elt_size_in_bytes();
            let src = (c.src.data_ptr() as usize + c.src_at as usize * size) as cusys::CUdeviceptr;
            let dst = c
                .dst
                .data_ptr()
                .cast::<u8>()
                .wrapping_add(c.dst_at as usize * size);
            // SAFETY: both ranges lie inside their tensors (checked above): live device memory
            // of this context and page-locked host memory, which `copy` keeps alive until the
            // copy has finished (its drop waits for `done`); the stream is live.
            enqueued = unsafe {
                cusys::cuMemcpyDtoHAsync_v2(dst.cast(), src, c.len as usize * size, stream.raw)
            }
            .result()
            .map_err(|e| format!("cuMemcpyDtoHAsync: {}", driver_text(e)));
        }
        // Recorded even after a failure, so that the drop waits for what was enqueued.
        copy.done.record(Some(stream))?;
        enqueued.map(|()| copy)
    }

    /// The event after the copies.
    pub(crate) fn done(&self) -> &Event {
        &self.done
    }

    /// Blocks the host until the copies have finished.
    pub(crate) fn wait(&self) -> Result<(), String> {
        self.done.synchronize()
    }
}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // The tensors are released after this: not before the copies are done with them.
        let _ = self.done.synchronize();
    }
}

/// `stream` waits for `event`; the context must be current.
fn wait_event(stream: cusys::CUstream, event: &Event) -> Result<(), String> {
    // SAFETY: both belong to the current context (checked by the callers' `current()`); the
    // null stream is its legacy default stream.
    unsafe {
        cu::stream::wait_event(
            stream,
            event.raw,
            cusys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
    }
    .map_err(|e| format!("cuStreamWaitEvent: {}", driver_text(e)))
}

/// Blocks until the compute stream of `device` has finished its work: the true end of what
/// was enqueued before, for timing. Kiln's own streams (NCCL's, a checkpoint copy) keep
/// running. A no-op on the CPU; when the driver cannot be reached this way, falls back to a
/// whole-device synchronization.
pub fn sync_compute(device: Device) {
    if let Device::Cuda(i) = device {
        let synced = Context::primary(i).and_then(|c| c.sync_compute());
        if synced.is_err() {
            tch::Cuda::synchronize(i as i64);
        }
    }
}
