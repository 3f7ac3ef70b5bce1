//! `kiln prepare` and `kiln data`: corpora tokenized into datasets of Parquet token shards,
//! and the datasets checked, described, merged or indexed.

use anyhow::Result;
use clap::Subcommand;
use kiln_shard_loader::index::{index, IndexOptions};
use kiln_shard_loader::prepare::{self, human, prepare, Dedup, PrepareOptions};
use kiln_shard_loader::TokenDataset;

#[derive(Subcommand)]
pub enum Commands {
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
    /// Inspect or check a prepared dataset.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

impl Commands {
    /// Runs the command to its end.
    pub fn run(self) -> Result<()> {
        match self {
            Commands::Prepare {
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
            Commands::Data { command } => match command {
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
        }
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
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

/// The tokenizer named on the command line, else the one recorded beside the weights, else a
/// `tokenizer.json` in the model directory.
/// The summary line of a written dataset.
fn print_prepared(url: &str, m: &kiln_proto::manifest::DatasetManifest) {
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
