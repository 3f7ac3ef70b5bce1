//! The token shard: one Parquet file, one row per document.
//!
//! Schema (written by [`ShardWriter`], read by [`read_shard`]):
//!
//! | column   | Arrow type                  | meaning                                        |
//! |----------|-----------------------------|------------------------------------------------|
//! | `doc_id` | `int64`, not null           | index of the document in the prepared corpus   |
//! | `tokens` | `list<int32 not null>`, not null | the document's token ids, EOS appended    |
//!
//! Row groups hold about [`ROW_GROUP_TOKENS`] tokens each (a document is never split);
//! columns are zstd-compressed. Any Parquet reader (pyarrow, DuckDB, Spark) reads it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{Array, ArrayRef, Int32Array, Int64Array, ListArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::ChunkReader;
use sha2::{Digest, Sha256};

use crate::tokenizer::hex;

/// Target tokens per row group: large enough for efficient reads, small enough to stream.
pub const ROW_GROUP_TOKENS: usize = 1 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ShardError {
    #[error("shard {path} is missing")]
    Missing { path: PathBuf },
    #[error("cannot read shard {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("cannot read bytes {}..{} of shard {shard}: {message}", range.start, range.end)]
    Fetch {
        shard: String,
        range: std::ops::Range<u64>,
        message: String,
    },
    #[error("shard {path} is {actual} bytes but the manifest records {expected}; it was truncated or replaced")]
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("cannot reach shard {path}: {message}")]
    Store { path: String, message: String },
    #[error(
        "shard {path} is corrupt: its SHA-256 is {actual} but the manifest records {expected}; prepare the dataset again or restore the file"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("shard {path} is not a readable Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("shard {path}: column {column:?} {problem}")]
    Column {
        path: PathBuf,
        column: String,
        problem: String,
    },
    #[error(
        "shard {path} holds token {token} (document {doc}) but the tokenizer has {vocab_size} ids"
    )]
    TokenOutOfRange {
        path: PathBuf,
        doc: u64,
        token: i64,
        vocab_size: u32,
    },
    #[error("shard {path}: {field} is {actual} but the manifest records {expected}")]
    CountMismatch {
        path: PathBuf,
        field: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("cannot write shard {path}: {message}")]
    Write { path: PathBuf, message: String },
}

pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::Int64, false),
        Field::new(
            "tokens",
            DataType::List(Arc::new(Field::new("item", DataType::Int32, false))),
            false,
        ),
    ]))
}

/// What a finished shard holds, for the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSummary {
    pub documents: u64,
    pub tokens: u64,
    pub row_groups: u64,
    pub row_group_tokens: Vec<u64>,
    pub row_group_sha256: Vec<String>,
    pub bytes: u64,
    pub sha256: String,
}

/// Writes documents into one shard, cutting row groups every [`ROW_GROUP_TOKENS`] tokens.
pub struct ShardWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
    ids: Vec<i64>,
    tokens: ListBuilder<Int32Builder>,
    pending_tokens: usize,
    row_group_tokens_target: usize,
    documents: u64,
    total_tokens: u64,
    row_group_tokens: Vec<u64>,
}

impl ShardWriter {
    /// A writer that cuts a row group once it holds `row_group_tokens` tokens.
    pub fn create(path: &Path, row_group_tokens: usize) -> Result<Self, ShardError> {
        let write_err = |message: String| ShardError::Write {
            path: path.to_owned(),
            message,
        };
        let file = File::create(path).map_err(|e| write_err(e.to_string()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).map_err(|e| write_err(e.to_string()))?,
            ))
            .set_max_row_group_row_count(None)
            .build();
        let writer = ArrowWriter::try_new(file, schema(), Some(props))
            .map_err(|e| write_err(e.to_string()))?;
        Ok(ShardWriter {
            path: path.to_owned(),
            writer,
            ids: Vec::new(),
            tokens: ListBuilder::new(Int32Builder::new()).with_field(Arc::new(Field::new(
                "item",
                DataType::Int32,
                false,
            ))),
            pending_tokens: 0,
            row_group_tokens_target: row_group_tokens.max(1),
            documents: 0,
            total_tokens: 0,
            row_group_tokens: Vec::new(),
        })
    }

    pub fn push(&mut self, doc_id: u64, tokens: &[u32]) -> Result<(), ShardError> {
        self.ids.push(doc_id as i64);
        for &t in tokens {
            self.tokens.values().append_value(t as i32);
        }
        self.tokens.append(true);
        self.pending_tokens += tokens.len();
        self.documents += 1;
        self.total_tokens += tokens.len() as u64;
        if self.pending_tokens >= self.row_group_tokens_target {
            self.flush_row_group()?;
        }
        Ok(())
    }

    fn flush_row_group(&mut self) -> Result<(), ShardError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let ids: ArrayRef = Arc::new(Int64Array::from(std::mem::take(&mut self.ids)));
        let tokens: ArrayRef = Arc::new(self.tokens.finish());
        let batch =
            RecordBatch::try_new(schema(), vec![ids, tokens]).map_err(|e| ShardError::Write {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        self.writer
            .write(&batch)
            .and_then(|()| self.writer.flush())
            .map_err(|e| ShardError::Write {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        self.row_group_tokens.push(self.pending_tokens as u64);
        self.pending_tokens = 0;
        Ok(())
    }

    /// Closes the file and returns its summary, checksum included.
    pub fn finish(mut self) -> Result<ShardSummary, ShardError> {
        self.flush_row_group()?;
        self.writer.close().map_err(|e| ShardError::Write {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        let (bytes, sha256) = file_sha256(&self.path)?;
        let row_group_sha256 = row_group_checksums(&self.path)?;
        Ok(ShardSummary {
            row_group_sha256,
            documents: self.documents,
            tokens: self.total_tokens,
            row_groups: self.row_group_tokens.len() as u64,
            row_group_tokens: self.row_group_tokens,
            bytes,
            sha256,
        })
    }
}

/// The byte range of row group `rg`: from its first column chunk's first page to the end of
/// its last column chunk.
pub fn row_group_range(metadata: &ParquetMetaData, rg: usize) -> std::ops::Range<u64> {
    let ranges = metadata
        .row_group(rg)
        .columns()
        .iter()
        .map(|c| c.byte_range());
    let start = ranges.clone().map(|(s, _)| s).min().unwrap_or(0);
    let end = ranges.map(|(s, l)| s + l).max().unwrap_or(0);
    start..end
}

/// SHA-256 of every row group's byte range of a local Parquet file.
fn row_group_checksums(path: &Path) -> Result<Vec<String>, ShardError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&file)
        .map_err(|e| ShardError::Parquet {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    (0..metadata.num_row_groups())
        .map(|rg| {
            let range = row_group_range(&metadata, rg);
            let bytes = file
                .get_bytes(range.start, (range.end - range.start) as usize)
                .map_err(|e| ShardError::Parquet {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
            Ok(hex(&Sha256::digest(&bytes)))
        })
        .collect()
}

/// Size and SHA-256 of a file.
pub fn file_sha256(path: &Path) -> Result<(u64, String), ShardError> {
    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(|e| io_error(path, e))?;
    Ok((bytes, hex(&hasher.finalize())))
}

fn io_error(path: &Path, e: std::io::Error) -> ShardError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ShardError::Missing {
            path: path.to_owned(),
        }
    } else {
        ShardError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

/// The documents of one shard: their ids and their tokens, concatenated.
#[derive(Debug, Default)]
pub struct ShardTokens {
    pub doc_ids: Vec<u64>,
    /// `offsets[i]..offsets[i + 1]` are document i's tokens; `offsets.len() == docs + 1`.
    pub offsets: Vec<usize>,
    pub tokens: Vec<u32>,
}

/// Reads a local shard's `column` of token lists, checking every id against `vocab_size`.
pub fn read_shard(path: &Path, column: &str, vocab_size: u32) -> Result<ShardTokens, ShardError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    read_parquet(file, &path.display().to_string(), column, vocab_size)
}

/// Reads a whole shard from any Parquet source (a file, or bytes fetched from a store);
/// `name` names it in errors.
pub fn read_parquet<R: parquet::file::reader::ChunkReader + 'static>(
    source: R,
    name: &str,
    column: &str,
    vocab_size: u32,
) -> Result<ShardTokens, ShardError> {
    let parquet_err = |e: &dyn std::fmt::Display| ShardError::Parquet {
        path: PathBuf::from(name),
        message: e.to_string(),
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(source)
        .map_err(|e| parquet_err(&e))?
        .build()
        .map_err(|e| parquet_err(&e))?;
    decode_reader(reader, name, name, column, vocab_size)
}

/// Decodes every batch a Parquet reader yields; `name` names the shard in token errors,
/// `error_path` (the shard, perhaps with its row group) in decoding errors.
pub fn decode_reader(
    reader: impl Iterator<Item = Result<RecordBatch, arrow_schema::ArrowError>>,
    name: &str,
    error_path: &str,
    column: &str,
    vocab_size: u32,
) -> Result<ShardTokens, ShardError> {
    let mut out = ShardTokens {
        offsets: vec![0],
        ..Default::default()
    };
    for batch in reader {
        let batch = batch.map_err(|e| ShardError::Parquet {
            path: PathBuf::from(error_path),
            message: e.to_string(),
        })?;
        decode_batch(&batch, name, column, vocab_size, &mut out)?;
    }
    Ok(out)
}

/// Appends the documents of one record batch to `out`. The token column may be a `list` or
/// `large_list` of `int32`, `int64`, `uint16` or `uint32` (what pyarrow, `datasets` and
/// other tools write); an optional `doc_id` `int64` column names documents in errors.
pub fn decode_batch(
    batch: &RecordBatch,
    name: &str,
    column: &str,
    vocab_size: u32,
    out: &mut ShardTokens,
) -> Result<(), ShardError> {
    use arrow_array::{LargeListArray, UInt16Array, UInt32Array};
    let col_err = |problem: String| ShardError::Column {
        path: PathBuf::from(name),
        column: column.to_owned(),
        problem,
    };
    let array = batch
        .column_by_name(column)
        .ok_or_else(|| col_err("is not in the file".into()))?;
    let wrong_type = || {
        col_err(format!(
            "has type {}, expected a list of int32, int64, uint16 or uint32",
            array.data_type()
        ))
    };
    let (values, offsets): (ArrayRef, Vec<usize>) =
        if let Some(l) = array.as_any().downcast_ref::<ListArray>() {
            let o = l.value_offsets().iter().map(|&o| o as usize).collect();
            (l.values().clone(), o)
        } else if let Some(l) = array.as_any().downcast_ref::<LargeListArray>() {
            let o = l.value_offsets().iter().map(|&o| o as usize).collect();
            (l.values().clone(), o)
        } else {
            return Err(wrong_type());
        };
    let ids = batch
        .column_by_name("doc_id")
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned());
    let any = values.as_any();
    // One typed pass per batch: check every id, then append the documents.
    let docs_before = out.doc_ids.len() as u64;
    let doc_of = |row: usize| {
        ids.as_ref()
            .map_or(docs_before + row as u64, |ids| ids.value(row) as u64)
    };
    let first_bad = |bad: Option<usize>, value: &dyn Fn(usize) -> i64| -> Result<(), ShardError> {
        let Some(i) = bad else { return Ok(()) };
        let row = offsets.partition_point(|&o| o <= i) - 1;
        Err(ShardError::TokenOutOfRange {
            path: PathBuf::from(name),
            doc: doc_of(row),
            token: value(i),
            vocab_size,
        })
    };
    let vocab = i64::from(vocab_size);
    let (start, end) = (offsets[0], offsets[offsets.len() - 1]);
    let base = out.tokens.len();
    if let Some(v) = any.downcast_ref::<Int32Array>() {
        let vals = &v.values()[start..end];
        let bad = vals.iter().position(|&t| t < 0 || i64::from(t) >= vocab);
        first_bad(bad.map(|b| b + start), &|i| i64::from(v.value(i)))?;
        out.tokens.extend(vals.iter().map(|&t| t as u32));
    } else if let Some(v) = any.downcast_ref::<Int64Array>() {
        let vals = &v.values()[start..end];
        let bad = vals.iter().position(|&t| t < 0 || t >= vocab);
        first_bad(bad.map(|b| b + start), &|i| v.value(i))?;
        out.tokens.extend(vals.iter().map(|&t| t as u32));
    } else if let Some(v) = any.downcast_ref::<UInt16Array>() {
        let vals = &v.values()[start..end];
        let bad = vals.iter().position(|&t| i64::from(t) >= vocab);
        first_bad(bad.map(|b| b + start), &|i| i64::from(v.value(i)))?;
        out.tokens.extend(vals.iter().map(|&t| u32::from(t)));
    } else if let Some(v) = any.downcast_ref::<UInt32Array>() {
        let vals = &v.values()[start..end];
        let bad = vals.iter().position(|&t| i64::from(t) >= vocab);
        first_bad(bad.map(|b| b + start), &|i| i64::from(v.value(i)))?;
        out.tokens.extend_from_slice(vals);
    } else {
        return Err(wrong_type());
    }
    for row in 0..array.len() {
        out.doc_ids.push(doc_of(row));
        out.offsets.push(base + offsets[row + 1] - start);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.parquet");
        let mut w = ShardWriter::create(&path, ROW_GROUP_TOKENS).unwrap();
        w.push(3, &[1, 2, 3, 9]).unwrap();
        w.push(5, &[4, 9]).unwrap();
        let summary = w.finish().unwrap();
        assert_eq!(
            (summary.documents, summary.tokens, summary.row_groups),
            (2, 6, 1)
        );
        let got = read_shard(&path, "tokens", 10).unwrap();
        assert_eq!(got.doc_ids, vec![3, 5]);
        assert_eq!(got.offsets, vec![0, 4, 6]);
        assert_eq!(got.tokens, vec![1, 2, 3, 9, 4, 9]);
        let err = read_shard(&path, "tokens", 9).unwrap_err().to_string();
        assert!(
            err.ends_with("holds token 9 (document 3) but the tokenizer has 9 ids"),
            "{err}"
        );
        let err = read_shard(&path, "ids", 10).unwrap_err().to_string();
        assert!(err.ends_with("column \"ids\" is not in the file"), "{err}");
        let err = read_shard(&path, "doc_id", 10).unwrap_err().to_string();
        assert!(
            err.ends_with("column \"doc_id\" has type Int64, expected a list of int32, int64, uint16 or uint32"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_is_a_parquet_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.parquet");
        let mut w = ShardWriter::create(&path, ROW_GROUP_TOKENS).unwrap();
        w.push(0, &[1, 2, 3]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_shard(&path, "tokens", 10).unwrap_err();
        assert!(matches!(err, ShardError::Parquet { .. }), "{err}");
    }
}
