//! `kiln train`: one rank of a training run, as a job file describes it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kiln_proto::job::JobConfig;
use kiln_telemetry::{names, Identity};
use kiln_worker::checkpoint::CommitGate;
use kiln_worker::device::resolve_device_for_rank;
use kiln_worker::metrics::RankMetrics;
use kiln_worker::supervised::{self, StdinGate};
use kiln_worker::train::{train, Event, Launch};

#[derive(Subcommand)]
pub enum Commands {
    /// Train a model as a job file describes.
    Train {
        job: PathBuf,
        /// Print nothing but errors (the metrics log is still written).
        #[arg(short, long)]
        quiet: bool,
        /// This process's global rank in a multi-process run.
        #[arg(long, env = "RANK", default_value_t = 0)]
        rank: usize,
        /// Number of processes in the run (data-parallel x tensor-parallel ranks).
        #[arg(long, env = "WORLD_SIZE", default_value_t = 1)]
        world_size: usize,
        /// Where every rank listens, in rank order: `host:port,host:port,...`; or only the
        /// ranks this one connects to (itself and its ring neighbours), as
        /// `rank=host:port,...`, which is what `kiln worker` passes. Without it, a
        /// multi-process run on one host uses MASTER_ADDR and ports MASTER_PORT + rank.
        #[arg(long, env = "KILN_PEERS", value_delimiter = ',')]
        peers: Vec<String>,
        /// Continue from a checkpoint: `latest` (the newest valid one in the job's
        /// checkpoint directory; a fresh start when there is none), `step-N`, or the URL of
        /// a checkpoint directory.
        #[arg(long, value_name = "latest|step-N|URL")]
        resume: Option<String>,
        /// Run under `kiln worker`: events as JSON lines on stdout, checkpoint commits on
        /// the coordinator's word (from stdin), and stop when stdin closes.
        #[arg(long, hide = true)]
        supervised: bool,
    },
}

impl Commands {
    /// Runs the command to its end.
    pub fn run(self) -> Result<()> {
        match self {
            Commands::Train {
                job,
                quiet,
                rank,
                world_size,
                peers,
                resume,
                supervised,
            } => {
                let job = JobConfig::load(&job)?;
                let launch = Launch {
                    resume,
                    commit_gate: supervised.then(|| StdinGate::start() as Arc<dyn CommitGate>),
                    // Under `kiln worker`: the coordinator's name for the job's run.
                    run: std::env::var("KILN_RUN").unwrap_or_default(),
                    ..launch(rank, world_size, peers)?
                };
                let world = launch.world_size();
                let quiet = quiet || supervised;
                let mut metrics = RankMetrics::new();
                let summary = train(&job, &launch, &mut |e| {
                    metrics.record(e);
                    if supervised {
                        supervised::print_event(e)
                    } else if !quiet && rank == 0 {
                        print_event(e)
                    }
                })
                .map_err(|e| {
                    let e = anyhow::Error::new(e);
                    if world > 1 {
                        e.context(format!("rank {rank} of {world}"))
                    } else {
                        e
                    }
                })?;
                if !quiet && rank == 0 {
                    if let (Some(first), Some(last)) =
                        (summary.losses.first(), summary.losses.last())
                    {
                        println!(
                        "done: training loss {first:.4} -> {last:.4}; waited for data {:.2}% of {:.1} s of training",
                        100.0 * summary.data_wait_s / summary.train_s.max(1e-9),
                        summary.train_s
                    );
                    }
                }
                Ok(())
            }
        }
    }
}

/// The launch of one rank: `--peers` as given, or derived from torchrun's variables.
fn launch(rank: usize, world_size: usize, peers: Vec<String>) -> Result<Launch> {
    if world_size <= 1 && peers.len() <= 1 {
        if rank != 0 {
            bail!("--rank {rank} needs --world-size greater than {rank}");
        }
        return Ok(Launch::default());
    }
    let peers = if peers.is_empty() {
        let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port: u16 = std::env::var("MASTER_PORT")
            .map_err(|_| anyhow::anyhow!("a multi-process run needs --peers (or KILN_PEERS, or MASTER_ADDR and MASTER_PORT)"))?
            .parse()
            .context("MASTER_PORT is not a port number")?;
        (0..world_size)
            .map(|r| format!("{addr}:{}", usize::from(port) + r))
            .collect()
    } else if peers.iter().any(|p| p.contains('=')) {
        sparse_peers(&peers, rank, world_size)?
    } else {
        peers
    };
    if peers.len() != world_size {
        bail!(
            "--peers names {} addresses but --world-size is {world_size}",
            peers.len()
        );
    }
    if rank >= world_size {
        bail!("--rank {rank} is outside --world-size {world_size}");
    }
    Ok(Launch {
        rank,
        peers,
        ..Launch::default()
    })
}

/// `rank=host:port` entries as one address per rank of the world, empty for the ranks not
/// named (this rank never connects to them).
fn sparse_peers(entries: &[String], rank: usize, world_size: usize) -> Result<Vec<String>> {
    let mut peers = vec![String::new(); world_size];
    for entry in entries {
        let Some((r, addr)) = entry.split_once('=') else {
            bail!("--peers mixes `host:port` and `rank=host:port` entries ({entry:?})");
        };
        let r: usize = r
            .trim()
            .parse()
            .with_context(|| format!("--peers entry {entry:?}: {r:?} is not a rank"))?;
        if r >= world_size {
            bail!("--peers entry {entry:?}: rank {r} is outside --world-size {world_size}");
        }
        peers[r] = addr.trim().to_owned();
    }
    if peers.get(rank).is_some_and(|a| a.is_empty()) {
        bail!("--peers gives no address for this rank ({rank})");
    }
    Ok(peers)
}

fn print_event(e: &Event) {
    match e {
        Event::Start {
            params,
            world,
            dp,
            tp,
            device,
            bf16,
            precision,
            peak_flops,
            train_sequences,
            validation_sequences,
            ..
        } => println!(
            "model {:.2}M parameters on {world} x {device} ({}) (dp {dp} x tp {tp}) | measured matmul peak {:.1} TFLOP/s | {train_sequences} train and {validation_sequences} validation sequences",
            *params as f64 / 1e6,
            if *bf16 { format!("{precision} autocast") } else { precision.clone() },
            peak_flops / 1e12
        ),
        Event::Step {
            step,
            steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
            mfu,
            step_s,
            data_wait,
            collective_wait,
            ..
        } => println!(
            "step {step:>6}/{steps} | loss {loss:.4} | lr {lr:.2e} | grad norm {grad_norm:.3} | {tokens_per_s:.0} tok/s | {:.1}% MFU | {:.0} ms/step | data wait {:.1}% | comm wait {:.1}%",
            mfu * 100.0,
            step_s * 1e3,
            data_wait * 100.0,
            collective_wait * 100.0
        ),
        Event::Eval {
            step, val_loss, tokens,
        } => println!("step {step:>6} | validation loss {val_loss:.4} over {tokens} tokens"),
        Event::Saved { path } => println!("saved weights to {}", path.display()),
        Event::Resumed {
            step,
            from,
            rejected,
        } => {
            for r in rejected {
                println!("skipped checkpoint {r}");
            }
            println!("resumed at step {step} from {from}");
        }
        Event::Checkpoint {
            step,
            url,
            pause_s,
            save_s,
            bytes,
            deleted,
        } => println!(
            "checkpoint step {step} committed: {url} | training held {:.0} ms | rank 0 wrote {:.1} MB in {:.2} s{}",
            pause_s * 1e3,
            *bytes as f64 / 1e6,
            save_s,
            if deleted.is_empty() {
                String::new()
            } else {
                format!(" | removed steps {deleted:?}")
            }
        ),
        // Only a supervising agent reads these, from a supervised rank's stdout.
        Event::RankObjectWritten { .. } => {}
    }
}

impl Commands {
    /// Who this process is, for the resource of its telemetry: a training rank names its job,
    /// rank, generation (under a coordinator), host and device.
    pub fn identity(&self) -> Identity {
        let Commands::Train {
            job,
            rank,
            world_size,
            ..
        } = self;
        let job = JobConfig::load(job).ok();
        let job_id = std::env::var("KILN_JOB_ID")
            .ok()
            .or_else(|| job.as_ref().map(|j| j.name.clone()))
            .unwrap_or_default();
        let mut id = Identity::new("kiln-train")
            .with(names::JOB_ID, job_id)
            .with(names::RANK, rank);
        if let Ok(generation) = std::env::var("KILN_GENERATION") {
            id = id.with(names::GENERATION, generation);
        }
        let local_rank = (*world_size > 1).then(|| {
            std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(*rank)
        });
        let device = job
            .and_then(|j| resolve_device_for_rank(&j.train.device, local_rank).ok())
            .map(|d| match d {
                tch::Device::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".to_string(),
            });
        if let Some(device) = device {
            id = id.with(names::DEVICE, device);
        }
        id
    }
}
