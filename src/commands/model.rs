//! The model tools: `kiln doctor` (this machine checked for training), `kiln sample`,
//! `kiln eval` and `kiln export`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::mixture::MixtureLoader;
use kiln_shard_loader::{LoaderOptions, TokenDataset, Tokenizer};
use kiln_worker::device::{resolve_bf16, resolve_device};
use kiln_worker::eval::evaluate;
use kiln_worker::export::export_hf;
use kiln_worker::generate::{generate, SampleOptions};
use kiln_worker::hf::{self, SaveOptions};
use kiln_worker::meta::{check_vocab, ModelMeta};
use kiln_worker::model::DecayPolicy;

use super::checkpoint::open_checkpoint;

#[derive(Subcommand)]
pub enum Commands {
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

impl Commands {
    /// Runs the command to its end.
    pub fn run(self) -> Result<()> {
        match self {
            Commands::Doctor { json } => {
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
            Commands::Sample {
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
            Commands::Eval {
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
                check_vocab(&data, dataset.manifest(), llama.config.vocab_size)?;
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
            Commands::Export {
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
                let meta = ModelMeta::read(&model)?;
                let options = SaveOptions {
                    kind,
                    max_shard_bytes,
                    eos_id: meta.as_ref().and_then(|m| m.eos_id),
                };
                hf::save(&llama, &out, &options)?;
                if let Some(meta) = meta {
                    meta.write(&out)?;
                }
                println!("exported {} to {}", model.display(), out.display());
                Ok(())
            }
        }
    }
}

fn load_tokenizer(model: &std::path::Path, name: Option<String>) -> Result<Tokenizer> {
    if let Some(name) = name {
        return Ok(Tokenizer::load(&name, None)?);
    }
    if let Some(kind) = ModelMeta::read(model)?.and_then(|m| m.tokenizer) {
        if kind != "huggingface" {
            return Ok(Tokenizer::load(&kind, None)?);
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
