//! Host tensor memory as byte slices, for the TCP ring to reduce in place.
//!
//! The only unsafe code of the CPU collectives lives here.
#![allow(unsafe_code)]

use tch::{Device, Tensor};

use super::CollectiveError;

/// Runs `f` on the bytes of `t`, which must be a contiguous CPU tensor.
///
/// The caller must not run libtorch operations that touch the same elements of `t` (through
/// any view) while `f` runs. The trainer upholds this: a gradient bucket handed to the
/// communication thread is not touched again until the thread reports it done.
pub(crate) fn with_bytes_mut<R>(
    t: &Tensor,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Result<R, CollectiveError> {
    if t.device() != Device::Cpu || !t.is_contiguous() {
        return Err(CollectiveError::Invalid(format!(
            "host collectives need a contiguous CPU tensor, got {:?} on {:?}",
            t.size(),
            t.device()
        )));
    }
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return Ok(f(&mut []));
    }
    let ptr = t.data_ptr() as *mut u8;
    // SAFETY: a contiguous CPU tensor with `numel` elements owns `len` initialized bytes
    // starting at `data_ptr()`, and its storage stays alive while `t` is borrowed for the
    // duration of this call. No Rust reference to this memory exists elsewhere: Kiln never
    // hands out slices of tensor memory except through this function, and the contract
    // above rules out concurrent libtorch writes to the same elements.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    Ok(f(bytes))
}
