//! `kiln`: the command-line front end. Each subcommand parses its arguments, validates them
//! into a library config and calls the library; nothing here trains or tokenizes by itself.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln_checkpoint::layout::parse_step_dir;
use kiln_checkpoint::{CheckpointStore, Listed, Manifest};
use kiln_coordinator::agent::{self, AgentOptions};
use kiln_coordinator::machine::Policy;
use kiln_coordinator::service::Config as CoordinatorConfig;
use kiln_coordinator::{self as coordinator, ops};
use kiln_proto::client::Target;
use kiln_proto::job::JobConfig;
use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::index::{index, IndexOptions};
use kiln_shard_loader::mixture::MixtureLoader;
use kiln_shard_loader::prepare::{self, human, prepare, Dedup, PrepareOptions};
use kiln_shard_loader::{LoaderOptions, TokenDataset, Tokenizer};
use kiln_telemetry::{names, Identity};
use kiln_worker::checkpoint::CommitGate;
use kiln_worker::device::{resolve_bf16, resolve_device, resolve_device_for_rank};
use kiln_worker::eval::evaluate;
use kiln_worker::export::export_hf;
use kiln_worker::generate::{generate, SampleOptions};
use kiln_worker::hf::{self, SaveOptions};
use kiln_worker::metrics::RankMetrics;
use kiln_worker::model::DecayPolicy;
use kiln_worker::supervised::{self, StdinGate};
use kiln_worker::train::{train, Event, Launch, KILN_META};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Pre-train Llama-style language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize a corpus (Parquet, JSONL plain/gzip/zstd, or text files; local or in a store)
    /// into a dataset of Parquet token shards, on one machine or as one part of many.
    Prepare {
        /// Files, directories, glob patterns or store URLs (s3://bucket/data/*/*.parquet).
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Output directory or store URL (s3://, az://, gs://, file://) for the shards and
        /// manifest.json.
        #[arg(short, long)]
        output: String,
        /// gpt2, cl100k_base, o200k_base, or the path of a Hugging Face tokenizer.json.
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        /// End-of-document token of a tokenizer.json (found automatically when common).
        #[arg(long)]
        eos_token: Option<String>,
        /// The JSONL field or Parquet column that holds each document's text.
        #[arg(long, alias = "text-key", default_value = "text")]
        text_column: String,
        /// Share of documents held out for validation (every round(1/f)-th document).
        #[arg(long, default_value_t = 0.05)]
        val_fraction: f64,
        /// Start a new shard after about this many tokens.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: u64,
        /// Start a new row group (the unit the loader fetches) after about this many tokens.
        #[arg(long, default_value_t = 1 << 20)]
        row_group_tokens: usize,
        /// Input bytes per unit of work (consecutive files; a larger file is its own unit).
        /// Units are what parts share out; changing this changes the dataset's layout.
        #[arg(long, default_value_t = kiln_shard_loader::prepare::UNIT_BYTES)]
        unit_bytes: u64,
        /// This machine's part, from 0 (with --parts).
        #[arg(long, default_value_t = 0, requires = "parts")]
        part: u32,
        /// How many machines share the work; each runs with its own --part.
        #[arg(long, default_value_t = 1)]
        parts: u32,
        /// Count and leave out unreadable documents (a null or non-string text, a malformed
        /// JSON line) and files, instead of stopping at the first.
        #[arg(long)]
        skip_bad_documents: bool,
        /// `exact`: keep one of identical documents, across every part.
        #[arg(long, value_parser = ["none", "exact"], default_value = "none")]
        dedup: String,
        /// Do not write the manifest when this part finds every unit finished (run
        /// `kiln data merge` later).
        #[arg(long)]
        no_merge: bool,
        /// Tokenizer threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Replace an existing dataset, or start a preparation over with other arguments.
        #[arg(long)]
        force: bool,
    },
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
        /// Where every rank listens, in rank order: `host:port,host:port,...`. Without it, a
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
    /// Run a coordinator: it accepts jobs, forms them on registered workers, and recovers
    /// or re-forms them from their newest checkpoint.
    Coordinator {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Where job state is kept, so a restarted coordinator picks its jobs up: a
        /// directory or store URL.
        #[arg(long, default_value = ".kiln/coordinator")]
        state: String,
        /// The shared token of workers and clients (generated and printed when not given).
        #[arg(long, env = "KILN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A worker not heard from for this many seconds is gone.
        #[arg(long, default_value_t = 10.0)]
        heartbeat_timeout_s: f64,
        #[arg(long, default_value_t = 1000)]
        heartbeat_interval_ms: u64,
        /// Failures in a row (no checkpoint committed between them) before a job fails.
        #[arg(long, default_value_t = 5)]
        max_restarts: u32,
        /// Evict a worker that straggles (computes 1.5x slower than the median) this long.
        #[arg(long)]
        evict_stragglers_after_s: Option<f64>,
        /// Serve TLS with this certificate (PEM) ...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// ... and key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve job-level metrics for Prometheus at http://ADDR/metrics (e.g.
        /// 0.0.0.0:9464).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Run worker processes for a coordinator: each trains the ranks it is given.
    Worker {
        #[command(flatten)]
        conn: Conn,
        /// The address other workers reach this host at.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Workers on this host (one per GPU).
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Where the ranks' job files go (default: `kiln-worker-PID` in the system's temporary
        /// directory, removed when this process exits; a given directory is kept).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        #[arg(long, default_value = "worker")]
        name: String,
        /// Stop when stdin closes (`kiln local`'s workers: none outlives it).
        #[arg(long, hide = true)]
        exit_with_stdin: bool,
    },
    /// Submit a job to a coordinator.
    Submit {
        job: PathBuf,
        #[command(flatten)]
        conn: Conn,
        /// Workers to run it on (default: parallel.tp, one data-parallel group).
        #[arg(long, default_value_t = 0)]
        workers: u32,
        /// Fewest workers it may continue on after a failure.
        #[arg(long, default_value_t = 1)]
        min_workers: u32,
        /// Most workers it may grow to (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_workers: u32,
        /// Follow it to its end with a progress bar.
        #[arg(long)]
        watch: bool,
    },
    /// The coordinator's jobs and workers, or one job (with --watch: followed to its end).
    Status {
        job: Option<String>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        watch: bool,
    },
    /// Change a job's worker count; it takes effect at the next checkpoint.
    Scale {
        job: String,
        #[arg(long)]
        workers: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop a job (its workers abort; its checkpoints stay).
    Stop {
        job: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// A job's event log: formations, failures, recoveries, checkpoints.
    Logs {
        job: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a job on this host: a coordinator and N worker processes.
    Local {
        job: PathBuf,
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Where the coordinator keeps its state (default: output.dir/coordinator).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 10.0)]
        heartbeat_timeout_s: f64,
        /// Serve the coordinator's metrics for Prometheus at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Write a self-contained HTML page (loss, throughput and step-time plots) from a run's
    /// metrics log.
    Report {
        /// The run: its output directory, a `metrics.jsonl`, a store URL holding one (the
        /// job's checkpoint directory), or the job file.
        run: String,
        /// Where to write the page (default: `report.html` in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Check this machine for Kiln: libtorch, CUDA and NCCL versions read from the loaded
    /// libraries, the devices, whether bf16 autocast computes in bf16, the matmul ceiling, and
    /// a few bf16 training steps against fp32 (on a GPU also NCCL's collectives). Exits
    /// non-zero when a check fails; each failure says what to fix.
    Doctor {
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from trained weights.
    Sample {
        /// A model directory (Kiln's output or a Hugging Face Llama directory).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long, default_value_t = 50)]
        top_k: i64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Tokenizer name or tokenizer.json; defaults to the one the model was trained with.
        #[arg(long)]
        tokenizer: Option<String>,
        #[arg(long, default_value = "auto")]
        device: String,
        /// auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16.
        #[arg(long, default_value = "auto", value_parser = ["auto", "fp32", "bf16"])]
        precision: String,
    },
    /// Print the mean next-token cross-entropy of a model on a dataset split, as JSON.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// A dataset directory or store URL written by `kiln prepare`.
        #[arg(long)]
        data: String,
        #[arg(long, default_value = "validation")]
        split: String,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Evaluate at most this many sequences (default: the whole split).
        #[arg(long)]
        max_sequences: Option<usize>,
        #[arg(long, default_value = "auto")]
        device: String,
        /// auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16.
        #[arg(long, default_value = "auto", value_parser = ["auto", "fp32", "bf16"])]
        precision: String,
    },
    /// Inspect or check a prepared dataset.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Inspect or check sharded training checkpoints.
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Write a model directory, or the weights of a training checkpoint of any layout, as
    /// a Hugging Face directory (optionally bf16, sharded).
    Export {
        /// A model directory (Kiln's output or a Hugging Face Llama directory).
        #[arg(
            long,
            required_unless_present = "checkpoint",
            conflicts_with = "checkpoint"
        )]
        model: Option<PathBuf>,
        /// A checkpoint: `.../checkpoints/step-N`, or a checkpoint directory (its newest).
        #[arg(long)]
        checkpoint: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// float32 or bfloat16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Largest safetensors file, in bytes, before the weights are split.
        #[arg(long, default_value_t = 5_000_000_000)]
        max_shard_bytes: u64,
    },
}

/// How to reach the coordinator.
#[derive(clap::Args)]
struct Conn {
    #[arg(
        long,
        env = "KILN_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// The CA certificate (PEM) of a coordinator that serves TLS.
    #[arg(long, env = "KILN_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl Conn {
    fn target(self) -> Target {
        Target {
            url: self.coordinator,
            token: self.token,
            tls_ca: self.tls_ca,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Every checkpoint under a checkpoint directory: committed, uncommitted or invalid.
    List { url: String },
    /// Read every byte of a checkpoint (`.../step-N`, or the newest under a directory) and
    /// check it against the manifest's checksums.
    Verify { url: String },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Shard count, documents, tokens, row groups and a presence check of each shard, as JSON.
    Stats { url: String },
    /// Re-read every shard: checksums, counts, and every token id against the vocabulary.
    Verify { url: String },
    /// Write the manifest of a `kiln prepare --parts N` run once every part has finished
    /// (the last part to finish does this itself unless it ran with --no-merge).
    Merge { url: String },
    /// Write a manifest for Parquet token files written by other tools (pyarrow, datasets).
    Index {
        /// Directory or store URL holding the `*.parquet` files.
        url: String,
        /// The column holding each document's token ids.
        #[arg(long)]
        column: String,
        /// Token ids must be below this.
        #[arg(long)]
        vocab_size: u32,
        /// The end-of-document id of the tokenizer that wrote the files.
        #[arg(long)]
        eos_id: u32,
        /// The last N files (in sorted order) become the validation split.
        #[arg(long, default_value_t = 0)]
        validation_files: usize,
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs to stderr; metrics and traces over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    // Dropped (flushed) when `main` returns.
    let _telemetry = kiln_telemetry::init(&identity(&cli.command));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors already embed their causes; print each cause only once.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Who this process is, for the resource of its telemetry: a training rank names its job,
/// rank, generation (under a coordinator), host and device.
fn identity(command: &Command) -> Identity {
    match command {
        Command::Train {
            job,
            rank,
            world_size,
            ..
        } => {
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
        Command::Coordinator { .. } | Command::Local { .. } => Identity::new("kiln-coordinator"),
        Command::Worker { .. } => Identity::new("kiln-worker"),
        _ => Identity::new("kiln"),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare {
            inputs,
            output,
            tokenizer,
            eos_token,
            text_column,
            val_fraction,
            shard_tokens,
            row_group_tokens,
            unit_bytes,
            part,
            parts,
            skip_bad_documents,
            dedup,
            no_merge,
            threads,
            force,
        } => {
            let options = PrepareOptions {
                inputs,
                output: output.clone(),
                tokenizer,
                eos_token,
                text_key: text_column,
                val_fraction,
                shard_tokens,
                row_group_tokens,
                unit_bytes,
                part,
                parts,
                skip_bad: skip_bad_documents,
                dedup: if dedup == "exact" {
                    Dedup::Exact
                } else {
                    Dedup::None
                },
                merge: !no_merge,
                threads,
                force,
                progress: true,
            };
            let s = prepare(&options)?;
            let per_s = |x: u64| human(x as f64 / s.seconds.max(1e-3));
            eprintln!(
                "{}: {} of {} units tokenized now ({} finished before), {} documents, {} tokens from {}B in {:.1} s ({} tokens/s, {} docs/s, {} threads)",
                if s.parts > 1 {
                    format!("part {} of {}", s.part, s.parts)
                } else {
                    "prepare".into()
                },
                s.units_done,
                s.units,
                s.units_resumed,
                human(s.documents as f64),
                human(s.tokens as f64),
                human(s.input_bytes as f64),
                s.seconds,
                per_s(s.tokens),
                per_s(s.documents),
                s.threads
            );
            match (&s.manifest, &s.merge_note) {
                (Some(m), _) => print_prepared(&output, m),
                (None, Some(note)) => eprintln!("{output}: manifest not written: {note}"),
                (None, None) => {}
            }
            Ok(())
        }
        Command::Train {
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
                if let (Some(first), Some(last)) = (summary.losses.first(), summary.losses.last()) {
                    println!(
                        "done: training loss {first:.4} -> {last:.4}; waited for data {:.2}% of {:.1} s of training",
                        100.0 * summary.data_wait_s / summary.train_s.max(1e-9),
                        summary.train_s
                    );
                }
            }
            Ok(())
        }
        Command::Coordinator {
            listen,
            state,
            token,
            heartbeat_timeout_s,
            heartbeat_interval_ms,
            max_restarts,
            evict_stragglers_after_s,
            tls_cert,
            tls_key,
            metrics_listen,
        } => {
            let token = match token.filter(|t| !t.is_empty()) {
                Some(t) => t,
                None => {
                    let t = ops::random_token();
                    eprintln!("no --token or KILN_TOKEN given; workers and clients need:\nexport KILN_TOKEN={t}");
                    t
                }
            };
            if !(heartbeat_timeout_s.is_finite() && heartbeat_timeout_s > 0.0) {
                bail!("--heartbeat-timeout-s must be a positive number of seconds");
            }
            let config = CoordinatorConfig {
                listen,
                token,
                state_url: state,
                policy: Policy {
                    heartbeat_timeout_s,
                    max_restarts,
                    evict_stragglers_after_s,
                    ..Policy::default()
                },
                heartbeat_interval: std::time::Duration::from_millis(heartbeat_interval_ms.max(50)),
                tls: tls_cert.zip(tls_key),
                metrics_listen,
            };
            runtime()?.block_on(async {
                let running = coordinator::service::start(config).await?;
                println!(
                    "kiln coordinator listening on {}; state in {}",
                    running.addr, running.state_url
                );
                if let Some(at) = running.metrics_addr {
                    println!("metrics for Prometheus at http://{at}/metrics");
                }
                let done = running.done;
                tokio::select! {
                    r = done => r.context("the coordinator task failed")??,
                    _ = tokio::signal::ctrl_c() => {}
                }
                Ok::<_, anyhow::Error>(())
            })
        }
        Command::Worker {
            conn,
            host,
            nproc_per_node,
            work_dir,
            name,
            exit_with_stdin,
        } => {
            // Without --work-dir, the rank job files go to a folder of this process's own,
            // removed when it exits.
            let temporary = work_dir.is_none();
            let work_dir = work_dir.unwrap_or_else(|| agent::default_work_dir(std::process::id()));
            let cleanup = {
                let dir = work_dir.clone();
                move || {
                    if temporary {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
            };
            if exit_with_stdin {
                // Its training processes follow: their stdin closes with this process.
                let cleanup = cleanup.clone();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                    cleanup();
                    std::process::exit(1);
                });
            }
            let options = AgentOptions {
                target: conn.target(),
                host,
                exe: std::env::current_exe().context("cannot find the kiln executable")?,
                work_dir,
                local_rank: None,
                label: name,
                threads: None,
            };
            if nproc_per_node == 0 {
                bail!("--nproc-per-node must be at least 1");
            }
            let ran = runtime()?.block_on(agent::run_many(options, nproc_per_node));
            cleanup();
            Ok(ran?)
        }
        Command::Submit {
            job,
            conn,
            workers,
            min_workers,
            max_workers,
            watch,
        } => {
            let target = conn.target();
            runtime()?.block_on(async {
                let id = ops::submit(&target, &job, workers, min_workers, max_workers).await?;
                println!("{id}");
                if watch {
                    finish(ops::watch(&target, &id).await?)?;
                }
                Ok(())
            })
        }
        Command::Status { job, conn, watch } => {
            let target = conn.target();
            let job = job.unwrap_or_default();
            runtime()?.block_on(async {
                if watch && !job.is_empty() {
                    finish(ops::watch(&target, &job).await?)
                } else {
                    if watch {
                        bail!("--watch follows one job: name it");
                    }
                    ops::status(&target, &job).await?;
                    Ok(())
                }
            })
        }
        Command::Scale { job, workers, conn } => {
            let target = conn.target();
            let message = runtime()?.block_on(ops::scale(&target, &job, workers))?;
            println!("{message}");
            Ok(())
        }
        Command::Stop { job, conn } => {
            let target = conn.target();
            let message = runtime()?.block_on(ops::stop(&target, &job))?;
            println!("{message}");
            Ok(())
        }
        Command::Logs { job, conn, follow } => {
            let target = conn.target();
            runtime()?.block_on(ops::logs(&target, &job, follow))?;
            Ok(())
        }
        Command::Local {
            job,
            workers,
            state,
            heartbeat_timeout_s,
            metrics_listen,
        } => {
            let options = ops::Local {
                metrics_listen,
                job,
                workers,
                exe: std::env::current_exe().context("cannot find the kiln executable")?,
                state_url: state,
                heartbeat_timeout: std::time::Duration::from_secs_f64(heartbeat_timeout_s.max(0.5)),
            };
            finish(runtime()?.block_on(ops::local(options))?)
        }
        Command::Report { run, output } => {
            let path = output.unwrap_or_else(|| PathBuf::from("report.html"));
            let written = runtime()?.block_on(coordinator::report::write(&run, &path))?;
            println!("wrote {}", written.display());
            Ok(())
        }
        Command::Doctor { json } => {
            let report = kiln_worker::doctor::run(env!("CARGO_PKG_VERSION"));
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
            if !report.healthy() {
                bail!("some checks failed (see above)");
            }
            Ok(())
        }
        Command::Sample {
            model,
            prompt,
            tokens,
            temperature,
            top_k,
            seed,
            tokenizer,
            device,
            precision,
        } => {
            let device = resolve_device(&device)?;
            let bf16 = resolve_bf16(&precision, device);
            let tokenizer = load_tokenizer(&model, tokenizer)?;
            let llama = hf::load(&model, DecayPolicy::default(), device)?;
            let mut ids = tokenizer.encode(&prompt)?;
            if ids.is_empty() {
                ids.push(tokenizer.eos_id());
            }
            let options = SampleOptions {
                max_new_tokens: tokens,
                temperature,
                top_k,
                seed,
                stop_token: None,
                bf16,
            };
            let out = generate(&llama, &ids, &options);
            println!("{}{}", prompt, tokenizer.decode(&out)?);
            Ok(())
        }
        Command::Eval {
            model,
            data,
            split,
            seq_len,
            batch_size,
            max_sequences,
            device,
            precision,
        } => {
            let split = match split.as_str() {
                "train" => SplitName::Train,
                "validation" => SplitName::Validation,
                other => bail!("unknown split {other:?}: expected train or validation"),
            };
            let device = resolve_device(&device)?;
            let bf16 = resolve_bf16(&precision, device);
            let llama = hf::load(&model, DecayPolicy::default(), device)?;
            let dataset = TokenDataset::open(&data)?;
            let vocab = dataset.manifest().vocab_size;
            if i64::from(vocab) > llama.config.vocab_size {
                bail!(
                    "the dataset {data} has {vocab} token ids but the model's vocab_size is {}",
                    llama.config.vocab_size
                );
            }
            let options = LoaderOptions {
                seq_len: seq_len as u64,
                shuffle: false,
                prefetch_samples: batch_size as u64 * 4,
                ..LoaderOptions::default()
            };
            let loader = dataset.loader(split, options)?;
            let mut loader = MixtureLoader::new(vec![loader], &[1.0], 0);
            let r = evaluate(&llama, &mut loader, batch_size.max(1), max_sequences, bf16)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Checkpoint { command } => match command {
            CheckpointCommand::List { url } => {
                let store = CheckpointStore::open(&url)?;
                let listed = store.list()?;
                if listed.is_empty() {
                    println!("no checkpoints under {url}");
                }
                for (step, l) in listed {
                    match l {
                        Listed::Committed(m) => {
                            let bytes: u64 = m.objects.iter().map(|o| o.size).sum();
                            println!(
                                "step-{step}: committed | dp {} x tp {}{} | {} objects, {:.1} MB",
                                m.mesh.dp,
                                m.mesh.tp,
                                if m.mesh.zero1 { " (ZeRO-1)" } else { "" },
                                m.objects.len(),
                                bytes as f64 / 1e6
                            )
                        }
                        Listed::Uncommitted => {
                            println!("step-{step}: not committed (no manifest): ignored")
                        }
                        Listed::Invalid(why) => println!("step-{step}: invalid manifest: {why}"),
                    }
                }
                Ok(())
            }
            CheckpointCommand::Verify { url } => {
                let (store, m) = open_checkpoint(&url)?;
                let step = m.step;
                let v = store.verify(step)?;
                println!(
                    "ok: step-{step}: {} objects, {} pieces, {:.1} MB, every checksum matches",
                    v.objects,
                    v.pieces,
                    v.bytes as f64 / 1e6
                );
                Ok(())
            }
        },
        Command::Data { command } => match command {
            DataCommand::Stats { url } => {
                let stats = TokenDataset::open(&url)?.stats();
                println!("{}", serde_json::to_string_pretty(&stats)?);
                Ok(())
            }
            DataCommand::Merge { url } => {
                let m = prepare::merge(&url, true)?;
                print_prepared(&url, &m);
                Ok(())
            }
            DataCommand::Verify { url } => {
                let dataset = TokenDataset::open(&url)?;
                dataset.verify()?;
                let m = dataset.manifest();
                println!(
                    "ok: {} shards, {} tokens, checksums and token ids verified",
                    m.train.shards.len() + m.validation.shards.len(),
                    m.train.tokens + m.validation.tokens
                );
                Ok(())
            }
            DataCommand::Index {
                url,
                column,
                vocab_size,
                eos_id,
                validation_files,
                force,
            } => {
                let options = IndexOptions {
                    url: url.clone(),
                    column,
                    vocab_size,
                    eos_id,
                    validation_files,
                    force,
                };
                let m = index(&options)?;
                println!(
                "indexed {url}: {} train files ({} documents, {} tokens), {} validation files ({} tokens)",
                m.train.shards.len(),
                m.train.documents,
                m.train.tokens,
                m.validation.shards.len(),
                m.validation.tokens
            );
                Ok(())
            }
        },
        Command::Export {
            model,
            checkpoint,
            out,
            dtype,
            max_shard_bytes,
        } => {
            let kind = match dtype.as_str() {
                "float32" | "fp32" => tch::Kind::Float,
                "bfloat16" | "bf16" => tch::Kind::BFloat16,
                other => bail!("unknown dtype {other:?}: expected float32 or bfloat16"),
            };
            let Some(model) = model else {
                let url = checkpoint.unwrap_or_default();
                let (store, manifest) = open_checkpoint(&url)?;
                let bf16 = kind == tch::Kind::BFloat16;
                let e = export_hf(&store, &manifest, &out, bf16, max_shard_bytes)?;
                println!(
                    "exported {} (step {}) to {}: {} tensors, {:.1} MB in {} file{}",
                    store.display(manifest.step, ""),
                    manifest.step,
                    out.display(),
                    e.tensors,
                    e.bytes as f64 / 1e6,
                    e.files,
                    if e.files == 1 { "" } else { "s" }
                );
                return Ok(());
            };
            let llama = hf::load(&model, DecayPolicy::default(), tch::Device::Cpu)?;
            let meta = std::fs::read_to_string(model.join(KILN_META)).ok();
            let eos_id = meta
                .as_deref()
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .and_then(|v| v.get("eos_id").and_then(|e| e.as_u64()))
                .map(|e| e as u32);
            let options = SaveOptions {
                kind,
                max_shard_bytes,
                eos_id,
            };
            hf::save(&llama, &out, &options)?;
            if let Some(meta) = meta {
                std::fs::write(out.join(KILN_META), meta)
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            println!("exported {} to {}", model.display(), out.display());
            Ok(())
        }
    }
}

/// The tokenizer named on the command line, else the one recorded beside the weights, else a
/// `tokenizer.json` in the model directory.
/// The summary line of a written dataset.
fn print_prepared(url: &str, m: &kiln_proto::manifest::Manifest) {
    let p = m.prepared.clone().unwrap_or_default();
    let mut left_out = Vec::new();
    if p.dedup.is_some() {
        left_out.push(format!("{} duplicates removed", p.duplicates_removed));
    }
    if p.skipped_documents + p.skipped_files > 0 {
        left_out.push(format!(
            "{} unreadable documents and {} unreadable files skipped",
            p.skipped_documents, p.skipped_files
        ));
    }
    let left_out = if left_out.is_empty() {
        String::new()
    } else {
        format!("; {}", left_out.join(", "))
    };
    println!(
        "prepared {url}: {} train documents ({} tokens in {} shards), {} validation documents ({} tokens); tokenizer {} (vocab {}, eos {}){left_out}; fingerprint {}",
        m.train.documents,
        m.train.tokens,
        m.train.shards.len(),
        m.validation.documents,
        m.validation.tokens,
        m.tokenizer.kind,
        m.vocab_size,
        m.eos_id,
        prepare::fingerprint(m),
    );
}

fn load_tokenizer(model: &std::path::Path, name: Option<String>) -> Result<Tokenizer> {
    if let Some(name) = name {
        return Ok(Tokenizer::load(&name, None)?);
    }
    if let Ok(text) = std::fs::read_to_string(model.join(KILN_META)) {
        let meta: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", model.join(KILN_META).display()))?;
        if let Some(kind) = meta.get("tokenizer").and_then(|k| k.as_str()) {
            if kind != "huggingface" {
                return Ok(Tokenizer::load(kind, None)?);
            }
        }
    }
    let local = model.join("tokenizer.json");
    if local.is_file() {
        return Ok(Tokenizer::load(&local.to_string_lossy(), None)?);
    }
    bail!(
        "no tokenizer known for {}: pass --tokenizer (gpt2, cl100k_base, o200k_base or a tokenizer.json)",
        model.display()
    )
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

/// Prints how a followed job ended; an error unless it completed.
fn finish(job: kiln_proto::rpc::JobStatus) -> Result<()> {
    println!("{}", ops::job_line(&job));
    if job.phase != "completed" {
        bail!("job {} {}: {}", job.job_id, job.phase, job.message);
    }
    Ok(())
}

/// The checkpoint a URL names: `.../step-N`, or the newest committed one under a checkpoint
/// directory.
fn open_checkpoint(url: &str) -> Result<(CheckpointStore, Manifest)> {
    let trimmed = url.trim_end_matches('/');
    if let Some((root, last)) = trimmed.rsplit_once('/') {
        if let Some(step) = parse_step_dir(last) {
            let store = CheckpointStore::open(root)?;
            let m = store.manifest(step)?;
            return Ok((store, m));
        }
    }
    let store = CheckpointStore::open(trimmed)?;
    match store.committed()?.into_iter().next() {
        Some(m) => Ok((store, m)),
        None => bail!("no committed checkpoint under {url}"),
    }
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
        Event::ShardWritten { .. } => {}
    }
}
