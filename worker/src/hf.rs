//! Hugging Face Llama checkpoint directories: `config.json` plus `model.safetensors`, or
//! several `*.safetensors` files listed in `model.safetensors.index.json`.
//!
//! Kiln's parameter names are Hugging Face's, so loading is a name-for-name copy (with dtype
//! conversion to fp32) and export writes the same names back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::config::{ConfigError, LlamaConfig};
use crate::model::{DecayPolicy, Llama};

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("{path} is not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{dir} has no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{dir} lacks tensor {name}")]
    MissingTensor { dir: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {actual:?}, the config implies {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("{path}: tensor {name} is not part of a Llama model")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has dtype {dtype}; Kiln reads F32, F16 and BF16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, HfError> {
    std::fs::read(path).map_err(|source| HfError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value, HfError> {
    serde_json::from_slice(&read(path)?).map_err(|e| HfError::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The model shape of a Hugging Face directory.
pub fn load_config(dir: &Path) -> Result<LlamaConfig, HfError> {
    let path = dir.join("config.json");
    LlamaConfig::from_hf_json(&read_json(&path)?).map_err(|source| HfError::Config { path, source })
}

/// A model with the weights of a Hugging Face directory, on `device`, for inference (no
/// gradient buffer).
pub fn load(dir: &Path, decay: DecayPolicy, device: Device) -> Result<Llama, HfError> {
    let config = load_config(dir)?;
    let model = Llama::new(&config, decay, device).without_grads();
    load_weights(&model, dir)?;
    Ok(model)
}

/// The safetensors files of a directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(HfError::NoWeights {
            dir: dir.to_owned(),
        });
    }
    let index = read_json(&index_path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| HfError::Json {
            path: index_path.clone(),
            message: "no weight_map object".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn to_tensor(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor, HfError> {
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        other => {
            return Err(HfError::Dtype {
                path: path.to_owned(),
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            })
        }
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| HfError::Safetensors {
        path: path.to_owned(),
        message: format!("tensor {name}: {e}"),
    })
}

/// Copies every tensor of the directory into `model`, checking names and shapes.
pub fn load_weights(model: &Llama, dir: &Path) -> Result<(), HfError> {
    let params = &model.params;
    let mut loaded = vec![false; params.entries().len()];
    for path in weight_files(dir)? {
        let bytes = read(&path)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| HfError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let Some(i) = params.index(&name) else {
                let harmless = name.ends_with("rotary_emb.inv_freq")
                    || (name == "lm_head.weight" && model.config.tie_embeddings);
                if harmless {
                    continue;
                }
                return Err(HfError::UnexpectedTensor { path, name });
            };
            let expected = params.entries()[i].spec.full_shape();
            let actual: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if actual != expected {
                return Err(HfError::Shape {
                    path,
                    name,
                    expected,
                    actual,
                });
            }
            params.set_full(i, &to_tensor(&path, &name, &view)?);
            loaded[i] = true;
        }
    }
    if let Some(i) = loaded.iter().position(|l| !l) {
        return Err(HfError::MissingTensor {
            dir: dir.to_owned(),
            name: params.entries()[i].spec.name.clone(),
        });
    }
    Ok(())
}

/// A tensor's name, shape and bytes, on the host, ready to serialize.
type HostTensor = (String, Vec<i64>, Vec<u8>);

/// How [`save`] writes weights.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// `Kind::Float` or `Kind::BFloat16`.
    pub kind: Kind,
    /// Start a new file once one holds this many bytes (Hugging Face's default is 5 GB).
    pub max_shard_bytes: u64,
    pub eos_id: Option<u32>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            kind: Kind::Float,
            max_shard_bytes: 5_000_000_000,
            eos_id: None,
        }
    }
}

/// Writes `model` as a Hugging Face directory that `transformers` loads with
/// `LlamaForCausalLM.from_pretrained`.
pub fn save(model: &Llama, dir: &Path, options: &SaveOptions) -> Result<(), HfError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| HfError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let mut config = model.config.to_hf_json(options.eos_id);
    let (dtype, dtype_name) = match options.kind {
        Kind::BFloat16 => (Dtype::BF16, "bfloat16"),
        _ => (Dtype::F32, "float32"),
    };
    config["torch_dtype"] = json!(dtype_name);
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    std::fs::write(&config_path, text).map_err(write_err(&config_path))?;

    // Group tensors into shards of at most max_shard_bytes, in parameter order.
    let mut shards: Vec<Vec<HostTensor>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for (i, e) in model.params.entries().iter().enumerate() {
        let t = model
            .params
            .view(i)
            .detach()
            .to_device(Device::Cpu)
            .to_kind(options.kind)
            .contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * options.kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)
            .map_err(|err| HfError::Safetensors {
                path: dir.to_owned(),
                message: format!("tensor {}: {err}", e.spec.name),
            })?;
        if shard_bytes > 0 && shard_bytes + data.len() as u64 > options.max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += data.len() as u64;
        if let Some(last) = shards.last_mut() {
            last.push((e.spec.name.clone(), e.spec.shape.clone(), data));
        }
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0u64;
    for (s, shard) in shards.iter().enumerate() {
        let file = weights_file(s, n);
        let mut views = Vec::with_capacity(shard.len());
        for (name, shape, data) in shard {
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            let view = TensorView::new(dtype, shape, data).map_err(|e| HfError::Safetensors {
                path: dir.join(&file),
                message: e.to_string(),
            })?;
            weight_map.insert(name.clone(), file.clone());
            total += data.len() as u64;
            views.push((name.clone(), view));
        }
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| {
            HfError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    }
    write_index(dir, n, total, &weight_map)
}

/// The name of weights file `k` of `n`: `model.safetensors` alone, else Hugging Face's
/// numbered names.
pub(crate) fn weights_file(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_owned()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", k + 1)
    }
}

/// Writes `model.safetensors.index.json` for `files` weights files (removing a stale one
/// when there is a single file).
pub(crate) fn write_index(
    dir: &Path,
    files: usize,
    total_bytes: u64,
    weight_map: &BTreeMap<String, String>,
) -> Result<(), HfError> {
    let path = dir.join("model.safetensors.index.json");
    let write_err = |source| HfError::Write {
        path: path.clone(),
        source,
    };
    if files > 1 {
        let index = json!({"metadata": {"total_size": total_bytes}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).unwrap_or_default();
        std::fs::write(&path, text).map_err(write_err)?;
    } else if path.exists() {
        std::fs::remove_file(&path).map_err(write_err)?;
    }
    Ok(())
}
