//! `kiln data index`: a Kiln manifest for Parquet token files written by other tools.
//!
//! Lists every `*.parquet` object under a prefix (sorted), reads each once, decodes every
//! row group of the named token column (a `list` or `large_list` of `int32`, `int64`,
//! `uint16` or `uint32`, any compression), checks every id against the given vocabulary
//! size, and writes `manifest.json` beside the files with the counts and checksums the
//! loader needs. The files themselves are not modified. The last `validation_files` files
//! form the validation split.

use futures::TryStreamExt;
use kiln_proto::manifest::{self, DatasetManifest, ShardInfo, Split, TokenizerInfo};
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::ParquetMetaDataReader;
use sha2::{Digest, Sha256};

use crate::dataset::DatasetError;
use crate::shard::{decode_reader, row_group_range, ShardError};
use crate::tokenizer::hex;
use kiln_store::{self as store, StoreLocation};

#[derive(Debug, Clone)]
pub struct IndexOptions {
    pub url: String,
    pub column: String,
    pub vocab_size: u32,
    pub eos_id: u32,
    pub validation_files: usize,
    pub force: bool,
}

fn store_err(location: &StoreLocation, name: &str, e: object_store::Error) -> ShardError {
    ShardError::Store {
        path: location.display(name),
        message: e.to_string(),
    }
}

/// Indexes the files and writes the manifest; returns it.
pub fn index(options: &IndexOptions) -> Result<DatasetManifest, DatasetError> {
    let location = store::open(&options.url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DatasetError::Runtime(e.to_string()))?;
    let manifest_key = location.child(manifest::FILE_NAME);
    match runtime.block_on(location.store.head(&manifest_key)) {
        Ok(_) if !options.force => {
            return Err(DatasetError::Exists(location.display(manifest::FILE_NAME)))
        }
        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(store_err(&location, manifest::FILE_NAME, e).into()),
    }
    let prefix = location.prefix.clone();
    let mut names: Vec<String> = runtime
        .block_on(location.store.list(Some(&prefix)).try_collect::<Vec<_>>())
        .map_err(|e| store_err(&location, "", e))?
        .into_iter()
        .filter_map(|meta| {
            let rel = meta.location.prefix_match(&prefix)?;
            let rel: Vec<String> = rel.map(|p| p.as_ref().to_owned()).collect();
            let rel = rel.join("/");
            rel.ends_with(".parquet").then_some(rel)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(DatasetError::NoParquet(options.url.clone()));
    }
    let mut shards = Vec::with_capacity(names.len());
    for name in &names {
        let display = location.display(name);
        let bytes = runtime
            .block_on(async {
                location
                    .store
                    .get(&location.child(name))
                    .await?
                    .bytes()
                    .await
            })
            .map_err(|e| store_err(&location, name, e))?;
        let perr = |e: parquet::errors::ParquetError| ShardError::Parquet {
            path: display.clone().into(),
            message: e.to_string(),
        };
        let metadata = ParquetMetaDataReader::new()
            .parse_and_finish(&bytes)
            .map_err(perr)?;
        let mut info = ShardInfo {
            path: name.clone(),
            documents: 0,
            tokens: 0,
            row_groups: metadata.num_row_groups() as u64,
            row_group_tokens: Vec::new(),
            row_group_sha256: Vec::new(),
            bytes: bytes.len() as u64,
            sha256: hex(&Sha256::digest(&bytes)),
        };
        for rg in 0..metadata.num_row_groups() {
            let range = row_group_range(&metadata, rg);
            info.row_group_sha256.push(hex(&Sha256::digest(
                &bytes[range.start as usize..range.end as usize],
            )));
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
                .map_err(perr)?
                .with_row_groups(vec![rg])
                .build()
                .map_err(perr)?;
            let error_path = format!("{display} (row group {rg})");
            let out = decode_reader(
                reader,
                &display,
                &error_path,
                &options.column,
                options.vocab_size,
            )?;
            info.documents += out.doc_ids.len() as u64;
            info.tokens += out.tokens.len() as u64;
            info.row_group_tokens.push(out.tokens.len() as u64);
        }
        shards.push(info);
    }
    let split_at = shards.len().saturating_sub(options.validation_files);
    let validation = shards.split_off(split_at);
    let split = |shards: Vec<ShardInfo>| Split {
        documents: shards.iter().map(|s| s.documents).sum(),
        tokens: shards.iter().map(|s| s.tokens).sum(),
        shards,
    };
    let manifest = DatasetManifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        tokenizer: TokenizerInfo {
            kind: "external".into(),
            sha256: None,
        },
        vocab_size: options.vocab_size,
        eos_id: options.eos_id,
        token_column: options.column.clone(),
        train: split(shards),
        validation: split(validation),
        prepared: None,
    };
    let body = bytes::Bytes::from(manifest.to_json());
    runtime
        .block_on(location.store.put(&manifest_key, body.into()))
        .map_err(|e| store_err(&location, manifest::FILE_NAME, e))?;
    Ok(manifest)
}
