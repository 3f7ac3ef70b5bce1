//! A checkpoint of any layout streamed into a Hugging Face Llama directory, one tensor in
//! memory at a time: `config.json`, `model.safetensors` (or several files and their
//! index), and Kiln's `kiln.json` naming the tokenizer.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_checkpoint::{CheckpointError, CheckpointManifest, CheckpointStore, Region};
use kiln_proto::run::TrainState;
use serde_json::json;

use crate::config::{ConfigError, LlamaConfig};
use crate::hf::{weights_file, write_index, HfError};
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
    let eos = state.eos_id;
    let mut hf_config = config.to_hf_json(eos);
    hf_config["torch_dtype"] = json!(if bf16 { "bfloat16" } else { "float32" });
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&hf_config).unwrap_or_default();
    std::fs::write(&config_path, text).map_err(write_err(&config_path))?;
    if state.meta.is_object() {
        let path = dir.join(KILN_META);
        let text = serde_json::to_string_pretty(&state.meta).unwrap_or_default();
        std::fs::write(&path, text).map_err(write_err(&path))?;
    }

    // The model's tensors (not the optimizer's), grouped into files by size.
    let elem = if bf16 { 2u64 } else { 4 };
    let mut files: Vec<Vec<(&String, &Vec<u64>)>> = vec![Vec::new()];
    let mut in_file = 0u64;
    for (name, info) in m.tensors.iter().filter(|(n, _)| !n.starts_with("optim.")) {
        let bytes = info.shape.iter().product::<u64>() * elem;
        if in_file > 0 && in_file + bytes > max_shard_bytes {
            files.push(Vec::new());
            in_file = 0;
        }
        in_file += bytes;
        if let Some(f) = files.last_mut() {
            f.push((name, &info.shape));
        }
    }
    let n = files.len();
    let mut weight_map = BTreeMap::new();
    let (mut total, mut tensors) = (0u64, 0usize);
    for (k, file) in files.iter().enumerate() {
        let name = weights_file(k, n);
        let path = dir.join(&name);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({ "format": "pt" }));
        let mut at = 0u64;
        for (tensor, shape) in file {
            let len = shape.iter().product::<u64>() * elem;
            header.insert(
                (*tensor).clone(),
                json!({
                    "dtype": if bf16 { "BF16" } else { "F32" },
                    "shape": shape,
                    "data_offsets": [at, at + len],
                }),
            );
            weight_map.insert((*tensor).clone(), name.clone());
            at += len;
        }
        let mut head = serde_json::to_vec(&header).unwrap_or_default();
        while !(8 + head.len()).is_multiple_of(8) {
            head.push(b' ');
        }
        let out = std::fs::File::create(&path).map_err(write_err(&path))?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, out);
        out.write_all(&(head.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&head))
            .map_err(write_err(&path))?;
        for (tensor, shape) in file {
            let region = Region::boxed(tensor, vec![0; shape.len()], (*shape).clone());
            let data = store.read(m, &[region])?.remove(0);
            let data = if bf16 {
                data.chunks_exact(4)
                    .flat_map(|b| {
                        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        half::bf16::from_f32(v).to_le_bytes()
                    })
                    .collect()
            } else {
                data
            };
            out.write_all(&data).map_err(write_err(&path))?;
            total += data.len() as u64;
            tensors += 1;
        }
        out.flush().map_err(write_err(&path))?;
    }
    write_index(dir, n, total, &weight_map)?;
    Ok(Exported {
        tensors,
        bytes: total,
        files: n,
    })
}
