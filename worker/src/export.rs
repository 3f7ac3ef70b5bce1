//! A checkpoint of any layout streamed into a Hugging Face Llama directory, one tensor in
//! memory at a time: `config.json`, `model.safetensors` (or several files and their
//! index), and Kiln's `kiln.json` naming the tokenizer.

use std::path::{Path, PathBuf};

use kiln_checkpoint::{CheckpointError, CheckpointManifest, CheckpointStore, Region};
use kiln_proto::run::TrainState;
use tch::Kind;

use crate::config::{ConfigError, LlamaConfig};
use crate::hf::{HfError, HfWriter, SaveOptions};
use crate::train::KILN_META;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("the checkpoint's model description: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Hf(#[from] HfError),
    #[error("the checkpoint's training state: {0}")]
    State(#[from] serde_json::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    pub tensors: usize,
    pub bytes: u64,
    pub files: usize,
}

/// Writes the weights of checkpoint `m` to `dir` as a Hugging Face directory, in bf16 when
/// `bf16` (else fp32), in files of at most `max_shard_bytes`.
pub fn export_hf(
    store: &CheckpointStore,
    m: &CheckpointManifest,
    dir: &Path,
    bf16: bool,
    max_shard_bytes: u64,
) -> Result<Exported, ExportError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ExportError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let state = TrainState::from_value(&m.train_state)?;
    let config = LlamaConfig::from_hf_json(&state.model)?;
    if state.meta.is_object() {
        let path = dir.join(KILN_META);
        let text = serde_json::to_string_pretty(&state.meta).unwrap_or_default();
        std::fs::write(&path, text).map_err(write_err(&path))?;
    }
    // The model's tensors (not the optimizer's), a tensor in memory at a time.
    let tensors: Vec<(String, Vec<u64>)> = m
        .tensors
        .iter()
        .filter(|(n, _)| !n.starts_with("optim."))
        .map(|(n, info)| (n.clone(), info.shape.clone()))
        .collect();
    let options = SaveOptions {
        kind: if bf16 { Kind::BFloat16 } else { Kind::Float },
        max_shard_bytes,
        eos_id: state.eos_id,
    };
    let mut out = HfWriter::create(dir, &config, &options, &tensors)?;
    for (tensor, shape) in &tensors {
        let region = Region::boxed(tensor, vec![0; shape.len()], shape.clone());
        let data = store.read(m, &[region])?.remove(0);
        out.write_f32_bytes(&data)?;
    }
    let exported = Exported {
        tensors: out.tensors,
        bytes: out.bytes,
        files: out.files(),
    };
    out.finish()?;
    Ok(exported)
}
