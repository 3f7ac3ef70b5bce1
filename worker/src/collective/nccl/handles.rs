//! The CUDA and NCCL handles of one communicator ([`Inner`]): NCCL's asynchronous errors,
//! the host's wait for the last collective, the abort after a failure, and the release of
//! the communicator when it is dropped.

use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::nccl::sys as ncsys;
use ncsys::ncclResult_t;

use super::ffi::{check, nccl_text};
use super::library::Api;
use crate::collective::tcp::collective_timeout;
use crate::cuda::{Context, Event, Stream};

/// The CUDA and NCCL handles of a communicator. Every use goes through the mutex of
/// [`NcclComm`](super::NcclComm).
pub(super) struct Inner {
    pub(super) api: &'static Api,
    pub(super) ctx: Arc<Context>,
    /// Null before initialization and after an abort.
    pub(super) comm: ncsys::ncclComm_t,
    pub(super) stream: Stream,
    /// Recorded on the compute stream before each plain collective.
    pub(super) ready: Event,
    /// Recorded on the NCCL stream after each collective.
    pub(super) done: Event,
    /// Whether deferred collectives were enqueued since the compute stream last waited on
    /// `done`.
    pub(super) pending: bool,
    /// Why the communicator was aborted.
    pub(super) failed: Option<String>,
}

// SAFETY: `Inner` holds handles, not thread-bound state. The CUDA handles are `Send` already
// (`crate::cuda`); the NCCL communicator may be used from any thread as long as calls on it
// do not overlap, and `Inner` is only reachable through the `Mutex` in `NcclComm`, which
// serializes them. `NcclComm` is then `Send` and `Sync` through `Mutex<Inner>`.
unsafe impl Send for Inner {}

impl Inner {
    pub(super) fn nccl_stream(&self) -> ncsys::cudaStream_t {
        self.stream.raw().cast()
    }

    /// An error NCCL found in the background (a lost peer, a failed kernel).
    pub(super) fn check_async(&self) -> Result<(), String> {
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
    pub(super) fn wait(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            if self
                .done
                .done()
                .map_err(|e| format!("waiting for NCCL: {e}"))?
            {
                return Ok(());
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
    pub(super) fn fail(&mut self, why: &str) {
        if !self.comm.is_null() {
            let ctx = self.ctx.clone();
            let _current = ctx.current();
            // SAFETY: `comm` is live and never used after this: it is cleared below.
            let _ = unsafe { (self.api.comm_abort)(self.comm) };
            self.comm = ptr::null_mut();
        }
        self.failed = Some(why.to_owned());
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The stream, the events and the context are released after this, by their own drops
        // (CUDA frees a stream or an event once the work enqueued on it completes).
        if self.comm.is_null() {
            return;
        }
        let ctx = self.ctx.clone();
        let current = ctx.current();
        // Let the collectives already enqueued finish before freeing the communicator; abort
        // instead when they cannot.
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
}
