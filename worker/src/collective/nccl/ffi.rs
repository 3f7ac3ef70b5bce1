//! Between Kiln's types and NCCL's C interface: element types and reductions as NCCL's,
//! NCCL's result codes as error text, and grouped calls.

use std::ffi::CStr;
use std::ptr;

use cudarc::nccl::sys as ncsys;
use ncsys::ncclResult_t;

use super::library::Api;
use crate::collective::{Elem, ReduceOp};

pub(super) fn nccl_type(elem: Elem) -> ncsys::ncclDataType_t {
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
pub(super) fn nccl_op(op: ReduceOp) -> ncsys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => ncsys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => ncsys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => ncsys::ncclRedOp_t::ncclMax,
    }
}

/// NCCL's text for an error, with the detail of the last failure when NCCL has one.
pub(super) fn nccl_text(api: &Api, e: ncclResult_t) -> String {
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

/// `Ok` for a call that succeeded (or is in progress, for non-blocking communicators),
/// else NCCL's text for the failure of `what`.
pub(super) fn check(api: &Api, what: &str, status: ncclResult_t) -> Result<(), String> {
    match status {
        ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => Ok(()),
        e => Err(format!("{what}: {}", nccl_text(api, e))),
    }
}

/// Runs `body` between `ncclGroupStart` and `ncclGroupEnd` (ended even when `body` fails).
pub(super) fn grouped(api: &Api, body: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    // SAFETY: group calls take no arguments; they only mark a group on this thread.
    check(api, "ncclGroupStart", unsafe { (api.group_start)() })?;
    let enqueued = body();
    // SAFETY: as above; closes the group opened here.
    let ended = check(api, "ncclGroupEnd", unsafe { (api.group_end)() });
    enqueued.and(ended)
}
