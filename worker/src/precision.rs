//! Mixed precision: bf16 autocast over fp32 master weights, on CUDA and on the CPU.
//!
//! `tch::autocast` calls libtorch's deprecated `at::autocast::set_enabled`, which turns on
//! CUDA autocast only, at CUDA's default dtype: float16. Kiln does not use it. [`autocast`]
//! sets autocast's dtype explicitly to bfloat16 for the device type the model runs on (CPU
//! or CUDA) through libtorch's `set_autocast_dtype` and `set_autocast_enabled`, which
//! `cpp/kiln_torch.cpp` binds, and restores the previous state when it returns. libtorch's
//! CPU autocast casts the ops Kiln uses the way its CUDA autocast does (linear, matmul and
//! scaled-dot-product attention to bf16; `rms_norm` runs in its input's dtype), so the bf16
//! path runs and is tested on CPU-only machines.
//!
//! fp16 is not offered: it would need dynamic loss scaling (the softmax part of the loss's
//! gradient, about 1e-9 per row at a large vocabulary, is below fp16's smallest subnormal),
//! and bf16 has fp32's exponent range.
//!
//! What a run reports as its precision is read back from libtorch: [`probe`] runs a linear
//! layer under [`autocast`] and returns the dtype libtorch produced.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr};

use tch::{Device, Kind, Tensor};

extern "C" {
    fn kiln_autocast_is_enabled(device_type: c_int) -> c_int;
    fn kiln_autocast_set_enabled(device_type: c_int, enabled: c_int) -> c_int;
    fn kiln_autocast_get_dtype(device_type: c_int) -> c_int;
    fn kiln_autocast_set_dtype(device_type: c_int, scalar_type: c_int) -> c_int;
    fn kiln_autocast_cache_enabled() -> c_int;
    fn kiln_autocast_set_cache_enabled(enabled: c_int) -> c_int;
    fn kiln_torch_config() -> *mut c_char;
    fn kiln_free(p: *mut c_char);
    fn kiln_torch_header_version() -> c_int;
}

/// c10's `DeviceType` values.
const CPU: c_int = 0;
const CUDA: c_int = 1;

/// The dtype the forward pass computes in under [`autocast`].
pub const AUTOCAST_KIND: Kind = Kind::BFloat16;

fn device_type(device: Device) -> c_int {
    match device {
        Device::Cuda(_) => CUDA,
        _ => CPU,
    }
}

/// c10's `ScalarType` value of `kind` (the order of `c10/core/ScalarType.h`).
fn scalar_type(kind: Kind) -> c_int {
    match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::BFloat16 => 15,
        other => unreachable!("autocast to {other:?} is never asked for"),
    }
}

fn kind_of(scalar_type: c_int) -> Option<Kind> {
    match scalar_type {
        5 => Some(Kind::Half),
        6 => Some(Kind::Float),
        15 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// The dtype autocast currently casts to on `device`'s type on this thread, `None` when
/// autocast is off there: read from libtorch.
pub fn active(device: Device) -> Option<Kind> {
    let t = device_type(device);
    // SAFETY: both functions take a device type by value, catch every C++ exception and only
    // read libtorch's thread-local autocast state.
    let (on, dtype) = unsafe { (kiln_autocast_is_enabled(t), kiln_autocast_get_dtype(t)) };
    (on == 1).then(|| kind_of(dtype)).flatten()
}

/// Restores the autocast state of one device type when dropped (also on a panic).
struct Restore {
    device_type: c_int,
    enabled: c_int,
    dtype: c_int,
    cache: c_int,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: as in `autocast`; the values were read from libtorch before they changed.
        unsafe {
            if torch_sys::at_autocast_decrement_nesting() == 0 {
                torch_sys::at_autocast_clear_cache();
            }
            kiln_autocast_set_enabled(self.device_type, self.enabled);
            if self.dtype >= 0 {
                kiln_autocast_set_dtype(self.device_type, self.dtype);
            }
            if self.cache >= 0 {
                kiln_autocast_set_cache_enabled(self.cache);
            }
        }
    }
}

/// Runs `f` with bf16 autocast on `device`'s type when `enabled` (else just runs it): the
/// matmuls of the forward pass compute in bf16 from the fp32 weights.
///
/// libtorch's cast cache is off inside: every use of a tensor casts it anew. The cache is
/// one map for the whole process, emptied whenever any thread leaves its outermost autocast,
/// and whether a cast came from it changes the autograd graph: three linears sharing one
/// cached bf16 copy of a leaf sum their gradients in bf16 before the cast back, three casts
/// sum them in fp32. With the cache, another thread's autocast could change this thread's
/// gradients in their last bits; without it they depend on the inputs alone. (Parameters are
/// views of the flat buffer, which libtorch never caches, so this costs only re-casts of the
/// tape's leaf activations.)
pub fn autocast<T>(enabled: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    let t = device_type(device);
    // SAFETY: every function below takes plain integers, catches C++ exceptions, and changes
    // only this thread's autocast state, which `Restore` puts back.
    let _restore = unsafe {
        let restore = Restore {
            device_type: t,
            enabled: kiln_autocast_is_enabled(t).max(0),
            dtype: kiln_autocast_get_dtype(t),
            cache: kiln_autocast_cache_enabled(),
        };
        torch_sys::at_autocast_increment_nesting();
        kiln_autocast_set_cache_enabled(0);
        let set = kiln_autocast_set_dtype(t, scalar_type(AUTOCAST_KIND));
        assert_eq!(set, 0, "libtorch refused bf16 autocast on {device:?}");
        kiln_autocast_set_enabled(t, 1);
        restore
    };
    f()
}

/// The dtype a linear layer of fp32 weights produces on `device` under
/// `autocast(enabled, ..)`: `BFloat16` when autocast works there, `Float` without it. What
/// runs report as their precision.
pub fn probe(enabled: bool, device: Device) -> Kind {
    tch::no_grad(|| {
        let x = Tensor::ones([2, 8], (Kind::Float, device));
        let w = Tensor::ones([4, 8], (Kind::Float, device));
        autocast(enabled, device, || x.linear::<Tensor>(&w, None).kind())
    })
}

/// The compute dtype of a run asked to use bf16 autocast (`bf16`) or not, read back from
/// libtorch with [`probe`]; an error when libtorch does not compute in the dtype asked for.
pub fn checked(bf16: bool, device: Device) -> Result<Kind, String> {
    let want = if bf16 { AUTOCAST_KIND } else { Kind::Float };
    match probe(bf16, device) {
        got if got == want => Ok(got),
        got => Err(format!(
            "precision {} was asked for on {device:?}, but libtorch computes a linear layer in \
             {got:?} there; run `kiln doctor` on this machine",
            kind_name(want)
        )),
    }
}

/// The name Kiln reports for a compute dtype: `bf16`, `fp16` or `fp32`.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        Kind::Float => "fp32",
        Kind::Double => "fp64",
        _ => "other",
    }
}

/// How the libtorch this process loaded was built (`at::show_config()`): a multi-line text
/// with `TORCH_VERSION=...`, `CUDA_VERSION=...` and `CUDNN_VERSION=...` among its build
/// settings.
pub fn torch_config() -> String {
    // SAFETY: `kiln_torch_config` returns a malloc'd NUL-terminated string or null; it is
    // copied, then freed once with `kiln_free`.
    unsafe {
        let p = kiln_torch_config();
        if p.is_null() {
            return String::new();
        }
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        kiln_free(p);
        s
    }
}

/// The libtorch version Kiln was compiled against (its headers), e.g. `2.11.0`; `None` when
/// the headers do not say.
pub fn torch_build_version() -> Option<String> {
    // SAFETY: returns an integer computed from compile-time constants.
    let v = unsafe { kiln_torch_header_version() };
    (v > 0).then(|| crate::device::dotted_version(v))
}

/// One `KEY=value` of [`torch_config`]'s build settings (`TORCH_VERSION`, `CUDA_VERSION`,
/// `CUDNN_VERSION`), as the loaded libtorch reports it.
pub fn torch_build_setting(config: &str, key: &str) -> Option<String> {
    config
        .split([',', '\n'])
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_autocast_yields_bf16_on_the_cpu_and_is_restored() {
        assert_eq!(active(Device::Cpu), None);
        assert_eq!(probe(true, Device::Cpu), Kind::BFloat16);
        assert_eq!(probe(false, Device::Cpu), Kind::Float);
        assert_eq!(checked(true, Device::Cpu), Ok(Kind::BFloat16));
        let x = Tensor::ones([3, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([5, 4], (Kind::Float, Device::Cpu));
        let inner = autocast(true, Device::Cpu, || {
            assert_eq!(active(Device::Cpu), Some(Kind::BFloat16));
            // Nested: still bf16 inside, still on after the inner one returns.
            autocast(true, Device::Cpu, || ());
            assert_eq!(active(Device::Cpu), Some(Kind::BFloat16));
            x.matmul(&w.tr()).kind()
        });
        assert_eq!(inner, Kind::BFloat16);
        assert_eq!(active(Device::Cpu), None, "autocast is off again");
        assert_eq!(x.linear::<Tensor>(&w, None).kind(), Kind::Float);
        assert_eq!(
            autocast(false, Device::Cpu, || x.linear::<Tensor>(&w, None).kind()),
            Kind::Float
        );
    }

    /// A leaf that two bf16 linears use gets the fp32 sum of their gradients, as when each
    /// runs alone: every use casts it anew, so no other thread's autocast (which empties
    /// libtorch's process-wide cast cache) changes the graph. With libtorch's cache on, both
    /// would share one cast and sum in bf16 (0.0625 off here at most when tried), unless
    /// another test thread happened to empty the cache between the two linears.
    #[test]
    fn each_use_of_a_leaf_casts_it_anew() {
        tch::manual_seed(11);
        let leaf = Tensor::randn([8, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let w = [0, 1].map(|_| Tensor::randn([64, 64], (Kind::Float, Device::Cpu)));
        let grad = |uses: &[&Tensor]| {
            let out = autocast(true, Device::Cpu, || {
                assert_eq!(
                    unsafe { kiln_autocast_cache_enabled() },
                    0,
                    "cache off inside"
                );
                let ys: Vec<Tensor> = uses
                    .iter()
                    .map(|w| leaf.linear::<Tensor>(w, None))
                    .collect();
                Tensor::stack(&ys, 0).to_kind(Kind::Float).sum(Kind::Float)
            });
            Tensor::run_backward(&[out], &[&leaf], false, false).remove(0)
        };
        let alone = grad(&[&w[0]]) + grad(&[&w[1]]);
        assert!(grad(&[&w[0], &w[1]]).equal(&alone));
        assert_eq!(unsafe { kiln_autocast_cache_enabled() }, 1, "restored");
    }

    #[test]
    fn the_loaded_libtorch_reports_its_version() {
        let config = torch_config();
        let version = torch_build_setting(&config, "TORCH_VERSION").expect(&config);
        assert!(version.starts_with("2."), "{version}");
        assert_eq!(torch_build_version(), Some(version));
        assert_eq!(torch_build_setting("A=1, B=, C=x", "B"), None);
        assert_eq!(
            torch_build_setting("A=1, B=2\n C=x", "C").as_deref(),
            Some("x")
        );
    }
}
