//! `kiln doctor`: what this machine gives Kiln, each item read or measured, never assumed.
//!
//! Versions come from the libraries loaded in this process (libtorch's build description,
//! `ncclGetVersion`, the CUDA driver); bf16 autocast is checked by running a linear layer
//! under it; the matmul ceiling is measured; a few training steps of a tiny model run in bf16
//! and in fp32 on each device and are compared. On a GPU the collective conformance suite
//! also runs on NCCL at world size 1. Each check that fails says what to fix.

use std::fmt::Write as _;
use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind};

use crate::collective::nccl::{nccl_library, NcclComm};
use crate::collective::{conformance, ProcessGroups};
use crate::config::LlamaConfig;
use crate::device::dotted_version;
use crate::model::{DecayPolicy, Llama};
use crate::optim::{AdamW, AdamWConfig};
use crate::parallel::{train_step, DataParallel};
use crate::precision;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    /// Not applicable here (for example a GPU check on a CPU-only machine).
    Skip,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was read or measured.
    pub value: String,
    /// For a failure: what to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    fn push(&mut self, name: impl Into<String>, status: Status, value: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            status,
            value: value.into(),
            fix: None,
        });
    }

    fn fail(&mut self, name: impl Into<String>, value: impl Into<String>, fix: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            status: Status::Fail,
            value: value.into(),
            fix: Some(fix.into()),
        });
    }

    /// Whether every check passed or was skipped.
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// The report as a plain-text table, then one line per failure with its fix.
    pub fn table(&self) -> String {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .fold("check".len(), usize::max);
        let mut s = format!("{:width$}  status  result\n", "check");
        for c in &self.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            let _ = writeln!(s, "{:width$}  {status:6}  {}", c.name, c.value);
        }
        for c in self.checks.iter().filter(|c| c.fix.is_some()) {
            let _ = writeln!(s, "\n{}: {}", c.name, c.fix.as_deref().unwrap_or(""));
        }
        s
    }
}

/// Runs every check. `kiln_version` is what the binary reports as its own version.
pub fn run(kiln_version: &str) -> Report {
    let mut r = Report { checks: Vec::new() };
    r.push("kiln", Status::Ok, kiln_version);

    let config = precision::torch_config();
    let setting = |key| precision::torch_build_setting(&config, key);
    match setting("TORCH_VERSION") {
        Some(v) => {
            let mut value = format!("{v} (");
            match setting("CUDA_VERSION") {
                Some(c) => {
                    let _ = write!(value, "CUDA {c}");
                    if let Some(d) = setting("CUDNN_VERSION") {
                        let _ = write!(value, ", cuDNN {d}");
                    }
                }
                None => value.push_str("CPU only"),
            }
            let _ = write!(value, "; {} CPU threads)", tch::get_num_threads());
            let built = precision::torch_build_version();
            if built.as_deref().is_none_or(|b| b == v) {
                r.push("libtorch", Status::Ok, value);
            } else {
                r.fail(
                    "libtorch",
                    value,
                    format!(
                        "this binary was built against libtorch {b}; run it with that version \
                         (torch=={b} from PyPI, or LD_LIBRARY_PATH pointing at it)",
                        b = built.unwrap_or_default()
                    ),
                );
            }
        }
        None => r.fail(
            "libtorch",
            "the loaded libtorch does not report its version",
            "reinstall torch (scripts/setup.sh installs the pinned wheel into .venv)",
        ),
    }

    let gpus = cuda_devices(&mut r, setting("CUDA_VERSION").is_some());

    match nccl_library() {
        Ok((path, v)) => {
            let status = if v / 100 == 2228 || gpus.is_empty() {
                Status::Ok
            } else {
                Status::Fail
            };
            let path = path.canonicalize().unwrap_or(path);
            let value = format!("{} from {}", dotted_version(v), path.display());
            if status == Status::Ok {
                r.push("nccl", Status::Ok, value);
            } else {
                r.fail(
                    "nccl",
                    value,
                    "Kiln is built for NCCL 2.28 (torch 2.11's); install nvidia-nccl-cu13 2.28 \
                     or set KILN_NCCL_LIBRARY to its libnccl.so.2",
                );
            }
        }
        Err(e) if gpus.is_empty() => r.push("nccl", Status::Skip, format!("not loaded: {e}")),
        Err(e) => r.fail(
            "nccl",
            e.to_string(),
            "install NCCL 2.28 (pip install nvidia-nccl-cu13, or the libnccl2 package) or set \
             KILN_NCCL_LIBRARY to its libnccl.so.2",
        ),
    }

    let devices: Vec<Device> = std::iter::once(Device::Cpu)
        .chain(gpus.iter().map(|&i| Device::Cuda(i)))
        .collect();
    for &device in &devices {
        let name = device_name(device);
        match precision::probe(true, device) {
            Kind::BFloat16 => r.push(
                format!("bf16 autocast {name}"),
                Status::Ok,
                "a linear layer of fp32 weights computes in BFloat16",
            ),
            other => r.fail(
                format!("bf16 autocast {name}"),
                format!("a linear layer computes in {other:?}, not BFloat16"),
                "use torch 2.11 (older libtorch lacks CPU bf16 autocast or the explicit dtype)",
            ),
        }
        let fp32 = crate::device::measure_matmul_flops(device, Kind::Float);
        let bf16 = crate::device::measure_matmul_flops(device, Kind::BFloat16);
        r.push(
            format!("matmul {name}"),
            Status::Ok,
            format!("fp32 {}, bf16 {}", flops_text(fp32), flops_text(bf16)),
        );
    }
    for &i in &gpus {
        nccl_conformance(&mut r, i);
    }
    if gpus.is_empty() {
        r.push(
            "nccl collectives",
            Status::Skip,
            "the conformance suite on NCCL needs a GPU",
        );
    }
    for &device in &devices {
        training_step(&mut r, device);
    }
    r
}

/// The CUDA devices libtorch sees, one row each (name and memory from the driver).
fn cuda_devices(r: &mut Report, built_with_cuda: bool) -> Vec<usize> {
    if !tch::Cuda::is_available() {
        let why = if built_with_cuda {
            "libtorch has CUDA but sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        } else {
            "this libtorch is built without CUDA"
        };
        r.push("cuda", Status::Skip, why);
        return Vec::new();
    }
    let count = tch::Cuda::device_count().max(0) as usize;
    match crate::cuda::driver_info() {
        Ok(driver) => {
            r.push(
                "cuda",
                Status::Ok,
                format!("{count} device(s), driver supports CUDA {}", driver.version),
            );
            for (i, d) in driver.devices.iter().enumerate() {
                r.push(
                    format!("device cuda:{i}"),
                    Status::Ok,
                    format!("{}, {:.1} GiB", d.0, d.1 as f64 / (1u64 << 30) as f64),
                );
            }
        }
        Err(e) => r.fail(
            "cuda",
            format!("libtorch sees {count} device(s), but the CUDA driver: {e}"),
            "install or repair the NVIDIA driver (libcuda.so.1)",
        ),
    }
    (0..count).collect()
}

/// The collective conformance suite on an NCCL communicator of one rank on GPU `i`.
fn nccl_conformance(r: &mut Report, i: usize) {
    let name = format!("nccl collectives cuda:{i}");
    let start = Instant::now();
    let result = NcclComm::unique_id()
        .and_then(|id| NcclComm::new(0, 1, id, i))
        .map_err(|e| e.to_string())
        .and_then(|comm| conformance::run(&comm, Device::Cuda(i), 7));
    match result {
        Ok(cases) => r.push(
            name,
            Status::Ok,
            format!(
                "{cases} conformance cases at world size 1 in {:.1} s",
                start.elapsed().as_secs_f64()
            ),
        ),
        Err(e) => r.fail(
            name,
            e,
            "NCCL failed on this GPU; run with NCCL_DEBUG=INFO for its own diagnosis",
        ),
    }
}

/// Five AdamW steps of a tiny model on `device` in bf16 and in fp32 from the same weights and
/// tokens: the bf16 losses must be finite, fall, and stay within 0.05 of fp32's (measured on
/// the CPU: about 1e-3).
fn training_step(r: &mut Report, device: Device) {
    let name = format!("bf16 training {}", device_name(device));
    let run = |bf16: bool| -> Result<Vec<f64>, String> {
        let mut c = LlamaConfig::preset("tiny").map_err(|e| e.to_string())?;
        c.vocab_size = 512;
        let model = Llama::new(&c, DecayPolicy::default(), device);
        model.init(11);
        let mut dp = DataParallel::new(&model, ProcessGroups::single(), 25.0, false);
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut optimizer = AdamW::new(config, &model.params);
        let g = tch::Tensor::arange(2 * 65, (Kind::Int64, Device::Cpu));
        let ids = (&g * 7919 + 13)
            .remainder(512)
            .view([2, 65])
            .to_device(device);
        let batch = [(ids.narrow(1, 0, 64), ids.narrow(1, 1, 64))];
        (0..5)
            .map(|_| {
                train_step(
                    &model,
                    &mut optimizer,
                    &mut dp,
                    &batch,
                    3e-3,
                    1.0,
                    bf16,
                    &mut || {},
                )
                .map(|s| s.loss)
                .map_err(|e| e.to_string())
            })
            .collect()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(true).and_then(|b| run(false).map(|f| (b, f)))
    }))
    .unwrap_or_else(|_| Err("the training step panicked".into()));
    match result {
        Ok((b, f)) => {
            let diff = b
                .iter()
                .zip(&f)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            let value = format!(
                "tiny model, 5 steps: loss {:.4} -> {:.4} (fp32 {:.4} -> {:.4}, max |diff| {diff:.1e})",
                b[0], b[4], f[0], f[4]
            );
            let sane = b.iter().all(|l| l.is_finite()) && b[4] < b[0] && diff < 0.05;
            if sane {
                r.push(name, Status::Ok, value);
            } else {
                r.fail(
                    name,
                    value,
                    "bf16 training does not track fp32 here: run `cargo test -p kiln-worker \
                     precision` and report the output",
                );
            }
        }
        Err(e) => r.fail(name, e, "see the error; the fp32 path may work meanwhile"),
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

fn flops_text(f: f64) -> String {
    if f >= 1e12 {
        format!("{:.1} TFLOP/s", f / 1e12)
    } else {
        format!("{:.1} GFLOP/s", f / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_people_write_them() {
        assert_eq!(dotted_version(22809), "2.28.9");
        assert_eq!(dotted_version(23001), "2.30.1");
    }

    #[test]
    fn a_report_lists_failures_with_their_fix() {
        let mut r = Report { checks: Vec::new() };
        r.push("kiln", Status::Ok, "0.1.0");
        r.fail("nccl", "cannot load libnccl.so.2", "install NCCL 2.28");
        assert!(!r.healthy());
        let t = r.table();
        assert!(t.contains("kiln   ok      0.1.0"), "{t}");
        assert!(t.contains("nccl   FAIL    cannot load libnccl.so.2"), "{t}");
        assert!(t.ends_with("\nnccl: install NCCL 2.28\n"), "{t}");
    }
}
