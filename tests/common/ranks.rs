//! Multi-process runs: several `kiln train --rank R` processes on loopback, and what their
//! metrics and ledger say.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::{four_plays, path_str, read_metrics, Peers};

/// Starts `kiln train JOB` as `world` ranks on loopback, each with `extra` arguments and
/// environment `env`.
pub fn spawn_ranks_with(
    job: &Path,
    world: usize,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<Child> {
    let peers = Peers::bind(world);
    let list = peers.list();
    (0..world)
        .map(|r| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
            cmd.args(["train", path_str(job), "--rank", &r.to_string()])
                .args(["--world-size", &world.to_string(), "--peers", &list])
                .args(extra)
                .envs(env.iter().copied())
                .env("KILN_COLLECTIVE_TIMEOUT_S", "120")
                .env("KILN_RENDEZVOUS_TIMEOUT_S", "120")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            peers.hand_to(r, &mut cmd).spawn().expect("kiln starts")
        })
        .collect()
}

pub fn spawn_ranks(job: &Path, world: usize) -> Vec<Child> {
    spawn_ranks_with(job, world, &[], &[])
}

pub fn wait_all(children: Vec<Child>) -> Vec<Output> {
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("rank exits"))
        .collect()
}

/// Runs `job` on `world` processes and returns rank 0's output directory's step losses.
pub fn run(job: &Path, world: usize) -> Run {
    run_with(job, world, &[], &[])
}

/// `run` with extra arguments and environment for every rank.
pub fn run_with(job: &Path, world: usize, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let outputs = wait_all(spawn_ranks_with(job, world, extra, env));
    for (r, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} of {world} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Run::read(&output_dir(job))
}

/// The `[output] dir` of a job file.
pub fn output_dir(job: &Path) -> PathBuf {
    let text = std::fs::read_to_string(job).unwrap();
    let value: toml::Value = toml::from_str(&text).unwrap();
    PathBuf::from(value["output"]["dir"].as_str().unwrap())
}

#[derive(Debug)]
pub struct Run {
    pub losses: Vec<f64>,
    pub val_losses: Vec<f64>,
    pub ledger: String,
    pub start: serde_json::Value,
}

impl Run {
    pub fn read(out: &Path) -> Run {
        let metrics = read_metrics(&out.join("metrics.jsonl"));
        let of = |kind: &str, key: &str| -> Vec<f64> {
            metrics
                .iter()
                .filter(|m| m["type"] == kind)
                .map(|m| m[key].as_f64().unwrap())
                .collect()
        };
        Run {
            losses: of("step", "loss"),
            val_losses: of("eval", "val_loss"),
            ledger: std::fs::read_to_string(out.join("ledger.jsonl")).unwrap(),
            start: metrics[0].clone(),
        }
    }

    /// Asserts the same curve as `base` within `tol`, and the same samples.
    pub fn assert_matches(&self, base: &Run, tol: f64, what: &str) {
        assert_eq!(self.losses.len(), base.losses.len(), "{what}");
        let diff = max_diff(&self.losses, &base.losses);
        let val_diff = max_diff(&self.val_losses, &base.val_losses);
        println!(
            "{what}: max |loss difference| {diff:.3e} over {} steps, validation {val_diff:.3e}",
            self.losses.len()
        );
        assert!(
            diff <= tol,
            "{what}: {:?} vs {:?}",
            self.losses,
            base.losses
        );
        assert!(
            val_diff <= tol,
            "{what}: {:?} vs {:?}",
            self.val_losses,
            base.val_losses
        );
        assert_eq!(self.ledger, base.ledger, "{what}: the ledgers differ");
    }
}

pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A job file: the tiny model on four plays, `steps` steps of 8 sequences of 64 tokens
/// (micro-batches of `micro`), `parallel` and `checkpoint` as the sections' contents.
pub fn tiny_job(
    dir: &Path,
    name: &str,
    micro: i64,
    parallel: &str,
    checkpoint: &str,
    steps: i64,
) -> PathBuf {
    tiny_job_with(dir, name, 8, micro, parallel, checkpoint, steps)
}

/// [`tiny_job`] with a batch of `batch` sequences.
pub fn tiny_job_with(
    dir: &Path,
    name: &str,
    batch: i64,
    micro: i64,
    parallel: &str,
    checkpoint: &str,
    steps: i64,
) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let text = format!(
        r#"
name = "{name}"

[model]
preset = "tiny"

[data]
path = "{data}"

[train]
seq_len = 64
batch_size = {batch}
micro_batch_size = {micro}
steps = {steps}
seed = 3
device = "cpu"
threads = 1
log_every = 1
eval_every = 6
eval_batches = {eval_batches}

[optimizer]
lr = 3e-3
warmup_steps = 4

[parallel]
{parallel}

[checkpoint]
{checkpoint}

[output]
dir = "{out}"
"#,
        data = four_plays().display(),
        out = out.display(),
        // The same 16 validation sequences whatever the micro-batch.
        eval_batches = 16 / micro,
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}
