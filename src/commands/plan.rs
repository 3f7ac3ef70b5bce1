//! `kiln plan`: what a job needs per rank at a number of devices, and which meshes fit.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kiln_proto::job::JobConfig;
use kiln_proto::preflight;
use kiln_worker::hf;
use kiln_worker::plan::{plan, Hardware, Layout, Shape};

#[derive(Subcommand)]
pub enum Commands {
    /// Per-rank memory, FLOPs and step time of a job at N devices, and the meshes that fit
    /// (arithmetic only: nothing is allocated). Exits with an error, naming the smallest
    /// change that would fit, when the job's own layout does not.
    Plan {
        job: PathBuf,
        /// Devices (ranks) in all.
        #[arg(long, visible_alias = "gpus", default_value_t = 8)]
        devices: usize,
        /// `cuda` or `cpu`. Default: `cpu` when the job's `train.device` is, else `cuda`.
        #[arg(long)]
        device: Option<String>,
        /// Memory of one device, e.g. `80GiB`, `141GB`. Default: 80 GiB on CUDA; this
        /// machine's memory divided by the devices on the CPU.
        #[arg(long, visible_alias = "gpu-memory")]
        memory: Option<String>,
        /// Dense peak of one device in the job's precision, TFLOP/s. Default: the job's
        /// `train.peak_tflops`, else an H100's 989 (bf16) or 67 (fp32) on CUDA, 1 on the CPU.
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// The fraction of the peak a step reaches.
        #[arg(long, default_value_t = 0.4)]
        mfu: f64,
        /// One device's link bandwidth to its peers, Gbit/s each way. Default: 3600 (NVLink
        /// 4, 450 GB/s) on CUDA, 100 on the CPU.
        #[arg(long)]
        link_gbps: Option<f64>,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Commands {
    pub fn run(self) -> Result<()> {
        let Commands::Plan {
            job: path,
            devices,
            device,
            memory,
            peak_tflops,
            mfu,
            link_gbps,
            json,
        } = self;
        let job = JobConfig::load(&path)?;
        let model = match preflight::model(&job)? {
            Some(c) => c,
            None => {
                let dir = job.model.init_from.as_ref().expect("init_from");
                hf::load_config(dir)?
            }
        };
        let device = device.unwrap_or_else(|| {
            if job.train.device == "cpu" {
                "cpu".into()
            } else {
                "cuda".into()
            }
        });
        if device != "cpu" && device != "cuda" {
            bail!("--device {device:?}: expected cpu or cuda");
        }
        let cuda = device == "cuda";
        if devices == 0 || devices % job.parallel.tp != 0 {
            bail!(
                "--devices {devices}: the job's tensor-parallel size {} must divide it",
                job.parallel.tp
            );
        }
        let dp = devices / job.parallel.tp;
        // What `kiln train` would refuse with at this many ranks.
        kiln_worker::collective::ParallelDims::new(dp, job.parallel.tp, devices)
            .and_then(|d| d.with_shard(job.parallel.shard))
            .map_err(|e| anyhow::anyhow!("--devices {devices}: {e}"))?;
        if job.accumulation_steps_at(dp as i64).is_none() {
            // What `kiln train` would refuse with at this many ranks.
            bail!(
                "--devices {devices}: {}",
                kiln_worker::train::TrainError::Batch {
                    batch: job.train.batch_size,
                    dp,
                    micro: job.micro_batch_size(),
                }
            );
        }
        if !(mfu > 0.0 && mfu <= 1.0) {
            bail!("--mfu {mfu}: expected a fraction in (0, 1]");
        }
        let shape = Shape::of(&job, model, &device);
        let memory_bytes = match memory {
            Some(m) => parse_size(&m)?,
            None if cuda => 80.0 * (1u64 << 30) as f64,
            None => machine_memory()? / devices as f64,
        };
        let peak_tflops =
            peak_tflops
                .or(job.train.peak_tflops)
                .unwrap_or(match (cuda, shape.bf16) {
                    (true, true) => 989.0,
                    (true, false) => 67.0,
                    (false, _) => 1.0,
                });
        let hw = Hardware {
            device,
            devices,
            memory_bytes,
            peak_tflops,
            mfu,
            link_gbps: link_gbps.unwrap_or(if cuda { 3600.0 } else { 100.0 }),
        };
        let layout = Layout {
            dp,
            tp: job.parallel.tp,
            zero1: job.parallel.zero1,
            fsdp: job.parallel.fsdp,
            shard: job.parallel.shard,
            reshard_after_forward: job.parallel.reshard_after_forward,
            activation_checkpointing: job.train.activation_checkpointing.clone(),
            micro_batch_size: job.micro_batch_size(),
        };
        let p = plan(&job, shape, layout, hw);
        if json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            print!("{}", p.render());
        }
        if let Some(change) = &p.suggestion {
            bail!(
                "{} does not fit: it needs {:.2} GiB per rank at {}, a device has {:.2} GiB; \
                 the smallest change that fits: {change}",
                path.display(),
                p.estimate.memory.total / (1u64 << 30) as f64,
                kiln_worker::plan::describe(&p.estimate.layout),
                p.hardware.memory_bytes / (1u64 << 30) as f64,
            );
        }
        Ok(())
    }
}

/// `80GiB`, `80G` (binary), `141GB` (decimal), `512MiB`, or bytes.
fn parse_size(s: &str) -> Result<f64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("--memory {s:?}: expected a size such as 80GiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => (1u64 << 30) as f64,
        "t" | "tib" => (1u64 << 40) as f64,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => bail!("--memory {s:?}: unknown unit {other:?} (use GiB, GB, MiB or MB)"),
    };
    if n <= 0.0 {
        bail!("--memory {s:?}: must be positive");
    }
    Ok(n * scale)
}

/// This machine's memory, bytes (`MemTotal`).
fn machine_memory() -> Result<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib * 1024.0)
        .context("no MemTotal in /proc/meminfo: pass --memory")
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse_size("80GiB").unwrap(), 80.0 * (1u64 << 30) as f64);
        assert_eq!(parse_size("80G").unwrap(), 80.0 * (1u64 << 30) as f64);
        assert_eq!(parse_size("141GB").unwrap(), 141e9);
        assert_eq!(parse_size("512 MiB").unwrap(), 512.0 * 1048576.0);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("8XB").is_err());
    }
}
