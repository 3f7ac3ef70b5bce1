//! Hugging Face Llama checkpoint directories: `config.json` plus `model.safetensors`, or
//! several `*.safetensors` files listed in `model.safetensors.index.json`.
//!
//! Kiln's parameter names are Hugging Face's, so loading is a name-for-name copy (with dtype
//! conversion to fp32) and export writes the same names back.

use std::collections::BTreeMap;
use std::io::Write;
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
/// `LlamaForCausalLM.from_pretrained`, one tensor in host memory at a time.
pub fn save(model: &Llama, dir: &Path, options: &SaveOptions) -> Result<(), HfError> {
    let tensors: Vec<(String, Vec<u64>)> = model
        .params
        .entries()
        .iter()
        .map(|e| {
            (
                e.spec.name.clone(),
                e.spec.shape.iter().map(|&d| d as u64).collect(),
            )
        })
        .collect();
    let mut out = HfWriter::create(dir, &model.config, options, &tensors)?;
    for i in 0..tensors.len() {
        out.write_tensor(&model.params.view(i))?;
    }
    out.finish()
}

/// A Hugging Face directory written tensor by tensor, in the order given up front (the
/// headers are written first): `config.json`, then the weights files, then their index.
pub struct HfWriter {
    dir: PathBuf,
    bf16: bool,
    /// Per file: its tensors' names and shapes, in order.
    files: Vec<Vec<(String, Vec<u64>)>>,
    weight_map: BTreeMap<String, String>,
    /// The file being written and the index of the next tensor in it.
    file: usize,
    next: usize,
    out: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    pub bytes: u64,
    pub tensors: usize,
}

impl HfWriter {
    /// Writes `config.json` for `config` and prepares weights files for `tensors` (whole
    /// shapes, in the order they will be written), at most `options.max_shard_bytes` each.
    pub fn create(
        dir: &Path,
        config: &LlamaConfig,
        options: &SaveOptions,
        tensors: &[(String, Vec<u64>)],
    ) -> Result<HfWriter, HfError> {
        std::fs::create_dir_all(dir).map_err(write_err(dir))?;
        let bf16 = options.kind == Kind::BFloat16;
        let mut hf = config.to_hf_json(options.eos_id);
        hf["torch_dtype"] = json!(if bf16 { "bfloat16" } else { "float32" });
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&hf).unwrap_or_default();
        std::fs::write(&config_path, text).map_err(write_err(&config_path))?;
        let elem = if bf16 { 2u64 } else { 4 };
        let mut files: Vec<Vec<(String, Vec<u64>)>> = vec![Vec::new()];
        let mut in_file = 0u64;
        for (name, shape) in tensors {
            let bytes = shape.iter().product::<u64>() * elem;
            if in_file > 0 && in_file + bytes > options.max_shard_bytes {
                files.push(Vec::new());
                in_file = 0;
            }
            in_file += bytes;
            if let Some(f) = files.last_mut() {
                f.push((name.clone(), shape.clone()));
            }
        }
        let mut w = HfWriter {
            dir: dir.to_owned(),
            bf16,
            files,
            weight_map: BTreeMap::new(),
            file: 0,
            next: 0,
            out: None,
            bytes: 0,
            tensors: 0,
        };
        w.open(0)?;
        Ok(w)
    }

    /// The number of weights files.
    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// Starts weights file `k`: its safetensors header.
    fn open(&mut self, k: usize) -> Result<(), HfError> {
        let n = self.files.len();
        let name = weights_file(k, n);
        let path = self.dir.join(&name);
        let elem = if self.bf16 { 2u64 } else { 4 };
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({ "format": "pt" }));
        let mut at = 0u64;
        for (tensor, shape) in &self.files[k] {
            let len = shape.iter().product::<u64>() * elem;
            header.insert(
                tensor.clone(),
                json!({
                    "dtype": if self.bf16 { "BF16" } else { "F32" },
                    "shape": shape,
                    "data_offsets": [at, at + len],
                }),
            );
            self.weight_map.insert(tensor.clone(), name.clone());
            at += len;
        }
        let mut head = serde_json::to_vec(&header).unwrap_or_default();
        while !(8 + head.len()).is_multiple_of(8) {
            head.push(b' ');
        }
        let file = std::fs::File::create(&path).map_err(write_err(&path))?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
        out.write_all(&(head.len() as u64).to_le_bytes())
            .and_then(|()| out.write_all(&head))
            .map_err(write_err(&path))?;
        self.out = Some((path, out));
        self.file = k;
        self.next = 0;
        Ok(())
    }

    /// The next tensor, as fp32 little-endian bytes of its whole shape.
    pub fn write_f32_bytes(&mut self, data: &[u8]) -> Result<(), HfError> {
        if self.next == self.files[self.file].len() {
            self.close()?;
            self.open(self.file + 1)?;
        }
        let (name, shape) = &self.files[self.file][self.next];
        let expected = shape.iter().product::<u64>() * 4;
        let Some((path, out)) = self.out.as_mut() else {
            return Ok(());
        };
        if data.len() as u64 != expected {
            return Err(HfError::Safetensors {
                path: path.clone(),
                message: format!("tensor {name}: {} bytes, expected {expected}", data.len()),
            });
        }
        let written = if self.bf16 {
            let half: Vec<u8> = data
                .chunks_exact(4)
                .flat_map(|b| {
                    half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
                })
                .collect();
            out.write_all(&half).map(|()| half.len())
        } else {
            out.write_all(data).map(|()| data.len())
        }
        .map_err(write_err(path))?;
        self.bytes += written as u64;
        self.tensors += 1;
        self.next += 1;
        Ok(())
    }

    /// The next tensor, from any device and float kind.
    pub fn write_tensor(&mut self, t: &Tensor) -> Result<(), HfError> {
        let t = t
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * 4];
        t.f_copy_data_u8(&mut data, numel)
            .map_err(|err| HfError::Safetensors {
                path: self.dir.clone(),
                message: err.to_string(),
            })?;
        self.write_f32_bytes(&data)
    }

    fn close(&mut self) -> Result<(), HfError> {
        if let Some((path, mut out)) = self.out.take() {
            out.flush().map_err(write_err(&path))?;
        }
        Ok(())
    }

    /// Flushes the last file and writes the index; every tensor must have been written.
    pub fn finish(mut self) -> Result<(), HfError> {
        let written = self.file + 1 == self.files.len() && self.next == self.files[self.file].len();
        if !written {
            return Err(HfError::Safetensors {
                path: self.dir.clone(),
                message: format!("only {} tensors were written", self.tensors),
            });
        }
        self.close()?;
        write_index(&self.dir, self.files.len(), self.bytes, &self.weight_map)
    }
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> HfError {
    let path = path.to_owned();
    move |source| HfError::Write { path, source }
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
