//! A tensor's memory freed and given back under its views, as fully sharded parameters need
//! (PyTorch's FSDP frees a gathered parameter's storage with `resize_(0)` for the same
//! reason): autograd's saved tensors keep views of a block's gathered weights from its
//! forward to its backward pass, so dropping the tensors frees nothing, while emptying
//! their storage does, and refilling it before the backward pass gives the saved views their
//! values back. `cpp/kiln_torch.cpp` binds the two libtorch calls.
#![allow(unsafe_code)]

use tch::Tensor;

extern "C" {
    fn kiln_storage_reallocate(t: *const torch_sys::C_tensor, nbytes: usize) -> std::ffi::c_int;
    fn kiln_untracked(t: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
}

/// Frees the memory of `t`'s storage; its views keep their shapes and must not be read
/// until [`refill`].
pub fn free(t: &Tensor) {
    reallocate(t, 0);
}

/// Gives `t`'s storage (freed by [`free`]) room for `t`'s elements again, uninitialized.
pub fn refill(t: &Tensor) {
    reallocate(t, t.numel() * t.kind().elt_size_in_bytes());
}

fn reallocate(t: &Tensor, nbytes: usize) {
    // SAFETY: `as_ptr` is a live tch tensor handle for the duration of the call; the function
    // catches every C++ exception. The views of the storage are not read while it is empty:
    // the fully sharded store only frees segments whose next use is after `refill`.
    let r = unsafe { kiln_storage_reallocate(t.as_ptr(), nbytes) };
    assert_eq!(
        r, 0,
        "libtorch could not reallocate a storage of {nbytes} bytes"
    );
}

/// `t`'s data under a version counter of its own: autograd does not see writes through it
/// as changes to what it saved from `t`'s views (refilled data is the data they saved).
pub fn untracked(t: &Tensor) -> Tensor {
    // SAFETY: as above; the returned handle is a new `torch::Tensor` that tch owns.
    unsafe {
        let p = kiln_untracked(t.as_ptr());
        assert!(
            !p.is_null(),
            "libtorch could not take a tensor's variable data"
        );
        Tensor::from_ptr(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A view autograd saved reads the refilled values: the gradient of `x * w` for `x`
    /// is computed from `w`'s storage as it is at backward time, after a free and a refill
    /// written through an untracked handle, with no complaint about an in-place change.
    #[test]
    fn a_freed_storage_is_refilled_under_saved_views() {
        let buf = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let w = buf.narrow(0, 2, 2).set_requires_grad(true);
        let x = Tensor::from_slice(&[5.0f32, 6.0]).set_requires_grad(true);
        let y = (&x * &w).sum(Kind::Float);
        free(&buf);
        assert_eq!(w.size(), [2]);
        refill(&buf);
        untracked(&buf).copy_(&Tensor::from_slice(&[1.0f32, 2.0, 7.0, 8.0]));
        let g = Tensor::run_backward(&[y], &[&x], false, false).remove(0);
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![7.0, 8.0]);
        assert_eq!(buf.device(), Device::Cpu);
    }
}
