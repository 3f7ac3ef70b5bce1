//! Device and precision choice, and the measured matmul ceiling MFU is reported against.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeviceError {
    #[error("device {0:?} was asked for but CUDA is not available on this machine")]
    NoCuda(String),
    #[error("device {0:?} is not recognised: expected auto, cpu, cuda or cuda:N")]
    Unknown(String),
}

/// `auto` picks the first GPU when CUDA is available, else the CPU.
pub fn resolve_device(name: &str) -> Result<Device, DeviceError> {
    resolve_device_for_rank(name, None)
}

/// As [`resolve_device`], but `auto` and `cuda` pick GPU `local_rank` modulo the GPU count
/// for one rank of a multi-process run (one process per GPU).
pub fn resolve_device_for_rank(
    name: &str,
    local_rank: Option<usize>,
) -> Result<Device, DeviceError> {
    let cuda = tch::Cuda::is_available();
    let count = tch::Cuda::device_count().max(1) as usize;
    let mine = local_rank.map_or(0, |r| r % count);
    let index = match name {
        "auto" => {
            return Ok(if cuda {
                Device::Cuda(mine)
            } else {
                Device::Cpu
            })
        }
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Some(mine),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    match index {
        None => Err(DeviceError::Unknown(name.to_owned())),
        Some(n) if cuda && (n as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(n)),
        Some(_) => Err(DeviceError::NoCuda(name.to_owned())),
    }
}

/// Whether the forward pass runs under bf16 autocast ([`crate::precision::autocast`]):
/// `bf16` on any device, `auto` on CUDA only (on the CPU bf16 saves memory but, without
/// bf16 matrix units, is not faster than fp32: see benches/RESULTS.md).
pub fn resolve_bf16(precision: &str, device: Device) -> bool {
    matches!((precision, device), ("bf16", _) | ("auto", Device::Cuda(_)))
}

/// The matmul throughput this device reaches in `kind` (the run's compute dtype), in FLOP/s:
/// the best of a few square matrix multiplies, the ceiling MFU is measured against.
pub fn measure_matmul_flops(device: Device, kind: Kind) -> f64 {
    let (n, reps) = match device {
        Device::Cpu => (1024i64, 3),
        _ => (8192, 10),
    };
    tch::no_grad(|| {
        let a = Tensor::randn([n, n], (kind, device));
        let b = Tensor::randn([n, n], (kind, device));
        let _ = a.matmul(&b); // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            sync(device);
            let t = Instant::now();
            let c = a.matmul(&b);
            let _ = c.sum(Kind::Float).double_value(&[]);
            best = best.min(t.elapsed().as_secs_f64());
        }
        2.0 * (n * n * n) as f64 / best
    })
}

/// A version packed as `major * 10000 + minor * 100 + patch` (NCCL's `ncclGetVersion`, and
/// Kiln's reading of the libtorch headers) as people write it: `22809` -> `2.28.9`.
pub fn dotted_version(v: i32) -> String {
    format!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100)
}

pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_bad_names_are_refused() {
        assert_eq!(resolve_device("cpu"), Ok(Device::Cpu));
        assert_eq!(
            resolve_device("tpu").unwrap_err().to_string(),
            "device \"tpu\" is not recognised: expected auto, cpu, cuda or cuda:N"
        );
        if !tch::Cuda::is_available() {
            assert_eq!(resolve_device("auto"), Ok(Device::Cpu));
            assert_eq!(
                resolve_device("cuda:1"),
                Err(DeviceError::NoCuda("cuda:1".into()))
            );
        }
        assert!(resolve_bf16("bf16", Device::Cpu));
        assert!(!resolve_bf16("auto", Device::Cpu));
        assert!(!resolve_bf16("fp32", Device::Cuda(0)));
    }
}
