//! `kiln.json`: what Kiln records beside a model's weights (the tokenizer, its end-of-document
//! id and the dataset the model was trained on), so `kiln sample` and `kiln export` need no
//! flags; and the check that a model's vocabulary covers a dataset's token ids, which
//! `kiln train` and `kiln eval` share.

use std::path::{Path, PathBuf};

use kiln_proto::manifest::DatasetManifest;
use serde::{Deserialize, Serialize};

/// The file name of [`ModelMeta`] in a model directory.
pub const KILN_META: &str = "kiln.json";

/// The contents of `kiln.json`. Every field may be missing (a model directory written by
/// another tool, or an older Kiln).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The tokenizer's kind as `kiln prepare` recorded it (`gpt2`, ..., `huggingface`).
    #[serde(default)]
    pub tokenizer: Option<String>,
    #[serde(default)]
    pub tokenizer_sha256: Option<String>,
    #[serde(default)]
    pub eos_id: Option<u32>,
    /// The URL of the dataset the model was trained on.
    #[serde(default)]
    pub dataset: Option<String>,
    /// Everything else the file holds (the trainer adds its final `data_cursor`), kept as
    /// written so that a model copied through Kiln keeps it.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ModelMeta {
    /// What a model trained on `dataset` (at `url`) records.
    pub fn of_dataset(manifest: &DatasetManifest, url: &str) -> ModelMeta {
        ModelMeta {
            tokenizer: Some(manifest.tokenizer.kind.clone()),
            tokenizer_sha256: manifest.tokenizer.sha256.clone(),
            eos_id: Some(manifest.eos_id),
            dataset: Some(url.to_owned()),
            other: Default::default(),
        }
    }

    /// The `kiln.json` of a model directory: `None` when there is none.
    pub fn read(dir: &Path) -> Result<Option<ModelMeta>, MetaError> {
        let path = dir.join(KILN_META);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(MetaError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| MetaError::Parse { path, source })
    }

    /// Writes `kiln.json` into a model directory.
    pub fn write(&self, dir: &Path) -> Result<(), MetaError> {
        let path = dir.join(KILN_META);
        let text = serde_json::to_string_pretty(self).expect("plain data serializes");
        std::fs::write(&path, text).map_err(|source| MetaError::Write { path, source })
    }
}

pub use kiln_proto::manifest::{check_vocab, VocabTooSmall};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_reads_partial_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ModelMeta::read(dir.path()).unwrap(), None);
        let meta = ModelMeta {
            tokenizer: Some("gpt2".into()),
            tokenizer_sha256: None,
            eos_id: Some(50256),
            dataset: Some("runs/data".into()),
            other: [("data_cursor".to_owned(), serde_json::json!({"step": 3}))]
                .into_iter()
                .collect(),
        };
        meta.write(dir.path()).unwrap();
        assert_eq!(ModelMeta::read(dir.path()).unwrap(), Some(meta));
        std::fs::write(dir.path().join(KILN_META), r#"{"eos_id": 7}"#).unwrap();
        let partial = ModelMeta::read(dir.path()).unwrap().unwrap();
        assert_eq!((partial.eos_id, partial.tokenizer), (Some(7), None));
        std::fs::write(dir.path().join(KILN_META), "{").unwrap();
        let err = ModelMeta::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("kiln.json is not valid JSON"), "{err}");
    }
}
