//! `kiln checkpoint`: sharded training checkpoints listed and verified.

use anyhow::{bail, Result};
use clap::Subcommand;
use kiln_checkpoint::layout::parse_step_dir;
use kiln_checkpoint::{CheckpointManifest, CheckpointStore, Listed};

#[derive(Subcommand)]
pub enum Commands {
    /// Inspect or check sharded training checkpoints.
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
}

impl Commands {
    /// Runs the command to its end.
    pub fn run(self) -> Result<()> {
        match self {
            Commands::Checkpoint { command } => match command {
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
                            Listed::Invalid(why) => {
                                println!("step-{step}: invalid manifest: {why}")
                            }
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
        }
    }
}

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Every checkpoint under a checkpoint directory: committed, uncommitted or invalid.
    List { url: String },
    /// Read every byte of a checkpoint (`.../step-N`, or the newest under a directory) and
    /// check it against the manifest's checksums.
    Verify { url: String },
}

/// The checkpoint a URL names: `.../step-N`, or the newest committed one under a checkpoint
/// directory.
pub(crate) fn open_checkpoint(url: &str) -> Result<(CheckpointStore, CheckpointManifest)> {
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
