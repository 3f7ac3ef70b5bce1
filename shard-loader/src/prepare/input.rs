//! The corpus side of `kiln prepare`: which files the inputs name, and the documents in them.
//!
//! An input is a local path or a store URL: a file, a directory (or store prefix: every
//! corpus file below it) or a glob pattern (`s3://bucket/data/*/*.parquet`; `*` and `?` stop
//! at `/`). Formats go by extension:
//!
//! | extension | documents |
//! |---|---|
//! | `.parquet` | one per row of the text column, read a row group at a time |
//! | `.jsonl`, `.ndjson`, `.jsonl.gz`, `.json.gz`, `.jsonl.zst`, `.json.zst` | one per line, the text under the text key; decompressed as a stream |
//! | `.txt`, `.md` (and any file named explicitly) | the whole file is one document |
//!
//! A file in a remote store is first streamed to a local temporary file, then read as a
//! local one.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::Array;
use arrow_schema::DataType;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use tokio::runtime::Handle;

use super::PrepareError;
use kiln_store::{self as store, StoreLocation};

/// How a file's documents are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Jsonl(Compression),
    Parquet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The format of a corpus file by its name; `None` for files a directory walk skips.
pub(crate) fn format_of(name: &str) -> Option<Format> {
    let name = name.to_ascii_lowercase();
    let jsonl = |c| Some(Format::Jsonl(c));
    if name.ends_with(".parquet") {
        Some(Format::Parquet)
    } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        jsonl(Compression::None)
    } else if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
        jsonl(Compression::Gzip)
    } else if name.ends_with(".jsonl.zst") || name.ends_with(".json.zst") {
        jsonl(Compression::Zstd)
    } else if name.ends_with(".txt") || name.ends_with(".md") {
        Some(Format::Text)
    } else {
        None
    }
}

/// Where an input file is.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    Local(PathBuf),
    Store {
        location: StoreLocation,
        path: object_store::path::Path,
    },
}

/// One input file: its name (an absolute path or a URL), size and format.
#[derive(Debug, Clone)]
pub(crate) struct InputFile {
    pub name: String,
    pub size: u64,
    pub format: Format,
    pub source: Source,
}

/// Expands inputs to a sorted, de-duplicated list of files.
pub(crate) fn collect(inputs: &[String], rt: &Handle) -> Result<Vec<InputFile>, PrepareError> {
    let mut files = Vec::new();
    for input in inputs {
        let before = files.len();
        match input.split_once("://") {
            Some((scheme, _)) if scheme != "file" => collect_store(input, rt, &mut files)?,
            Some((_, path)) => collect_local(input, Path::new(path), &mut files)?,
            None => collect_local(input, Path::new(input), &mut files)?,
        }
        // A mistyped path must not silently shrink the dataset.
        if files.len() == before {
            return Err(PrepareError::Missing(input.clone()));
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files.dedup_by(|a, b| a.name == b.name);
    if files.is_empty() {
        return Err(PrepareError::NoInputs(inputs.to_vec()));
    }
    Ok(files)
}

fn local_file(path: &Path, explicit: bool) -> Result<Option<InputFile>, PrepareError> {
    let abs = std::path::absolute(path).map_err(|source| PrepareError::Read {
        path: path.to_owned(),
        source,
    })?;
    let name = abs.display().to_string();
    let format = match format_of(&name) {
        Some(f) => f,
        // A file named on the command line is read as text whatever its extension.
        None if explicit => Format::Text,
        None => return Ok(None),
    };
    let size = abs
        .metadata()
        .map_err(|source| PrepareError::Read {
            path: abs.clone(),
            source,
        })?
        .len();
    Ok(Some(InputFile {
        name,
        size,
        format,
        source: Source::Local(abs),
    }))
}

fn collect_local(input: &str, path: &Path, out: &mut Vec<InputFile>) -> Result<(), PrepareError> {
    if path.is_dir() {
        return walk(path, out);
    }
    if path.is_file() {
        out.extend(local_file(path, true)?);
        return Ok(());
    }
    let paths = glob::glob(&path.to_string_lossy()).map_err(|e| PrepareError::Pattern {
        pattern: input.to_owned(),
        message: e.to_string(),
    })?;
    for p in paths.filter_map(Result::ok).filter(|p| p.is_file()) {
        out.extend(local_file(&p, true)?);
    }
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<InputFile>) -> Result<(), PrepareError> {
    let read_err = |source| PrepareError::Read {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.extend(local_file(&path, false)?);
        }
    }
    Ok(())
}

fn list_err(url: &str, e: object_store::Error) -> PrepareError {
    PrepareError::Input {
        name: url.to_owned(),
        message: e.to_string(),
    }
}

/// A store URL: one object, every corpus file under a prefix, or a glob over a prefix.
fn collect_store(url: &str, rt: &Handle, out: &mut Vec<InputFile>) -> Result<(), PrepareError> {
    let (_, rest) = url.split_once("://").unwrap_or(("", url));
    // The part before the first pattern character's directory is the prefix to list.
    let (base, pattern) = match rest.find(['*', '?', '[']) {
        Some(i) => {
            let cut = rest[..i].rfind('/').map_or(0, |j| j + 1);
            let scheme_len = url.len() - rest.len();
            (&url[..scheme_len + cut], Some(&rest[cut..]))
        }
        None => (url, None),
    };
    let location = store::open(base.trim_end_matches('/'))?;
    let file = |path: object_store::path::Path, size: u64, explicit: bool| {
        let name = location.display_path(&path);
        let format = match format_of(&name) {
            Some(f) => Some(f),
            None if explicit => Some(Format::Text),
            None => None,
        };
        format.map(|format| InputFile {
            name,
            size,
            format,
            source: Source::Store {
                location: location.clone(),
                path,
            },
        })
    };
    let list = |prefix: &object_store::path::Path| {
        rt.block_on(async {
            let mut objects = Vec::new();
            let mut stream = location.store.list(Some(prefix));
            while let Some(meta) = stream.next().await {
                objects.push(meta.map_err(|e| list_err(url, e))?);
            }
            Ok::<_, PrepareError>(objects)
        })
    };
    match pattern {
        Some(pattern) => {
            let glob = glob::Pattern::new(pattern).map_err(|e| PrepareError::Pattern {
                pattern: url.to_owned(),
                message: e.to_string(),
            })?;
            let options = glob::MatchOptions {
                require_literal_separator: true,
                ..Default::default()
            };
            let prefix_len = location.prefix.as_ref().len();
            for meta in list(&location.prefix)? {
                let key = meta.location.as_ref();
                let relative = key[prefix_len..].trim_start_matches('/');
                if glob.matches_with(relative, options) {
                    out.extend(file(meta.location, meta.size, true));
                }
            }
        }
        None => match rt.block_on(location.store.head(&location.prefix)) {
            Ok(meta) => out.extend(file(meta.location, meta.size, true)),
            Err(object_store::Error::NotFound { .. }) => {
                for meta in list(&location.prefix)? {
                    out.extend(file(meta.location, meta.size, false));
                }
            }
            Err(e) => return Err(list_err(url, e)),
        },
    }
    Ok(())
}

/// A document read from a file, or why the record at `row` is not one.
pub(crate) enum Record {
    Doc(String),
    Bad { row: String, message: String },
}

/// Counts the bytes read through it, for the progress display.
struct Counting<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads every record of `file` in order into `sink`. `bytes` advances as the stored bytes
/// are consumed and ends at the file's size. An error is the file's: it cannot be read.
pub(crate) fn read_file(
    file: &InputFile,
    text_key: &str,
    rt: &Handle,
    bytes: &Arc<AtomicU64>,
    sink: &mut dyn FnMut(Record) -> Result<(), PrepareError>,
) -> Result<(), PrepareError> {
    let start = bytes.load(Ordering::Relaxed);
    let result = read_any(file, text_key, rt, bytes, sink);
    // Whatever was counted, the file is now done.
    let counted = bytes.load(Ordering::Relaxed) - start;
    bytes.fetch_add(file.size.saturating_sub(counted), Ordering::Relaxed);
    result
}

fn read_any(
    file: &InputFile,
    text_key: &str,
    rt: &Handle,
    bytes: &Arc<AtomicU64>,
    sink: &mut dyn FnMut(Record) -> Result<(), PrepareError>,
) -> Result<(), PrepareError> {
    // A file in a store is streamed to a local temporary file first.
    let _staged;
    let path = match &file.source {
        Source::Local(path) => path.clone(),
        Source::Store { location, path } => {
            _staged = download(file, location, path, rt)?;
            _staged.path().to_owned()
        }
    };
    let f = File::open(&path).map_err(|e| file_err(file, e))?;
    let counted = || Counting {
        inner: f,
        counter: bytes.clone(),
    };
    match file.format {
        Format::Parquet => read_parquet(file, &path, text_key, bytes, sink),
        Format::Jsonl(c) => read_jsonl(file, counted(), c, text_key, sink),
        Format::Text => read_text(file, counted(), sink),
    }
}

pub(crate) fn file_err(file: &InputFile, e: impl std::fmt::Display) -> PrepareError {
    PrepareError::Input {
        name: file.name.clone(),
        message: e.to_string(),
    }
}

fn download(
    file: &InputFile,
    location: &StoreLocation,
    path: &object_store::path::Path,
    rt: &Handle,
) -> Result<tempfile::NamedTempFile, PrepareError> {
    use std::io::Write;
    let mut tmp = tempfile::NamedTempFile::new().map_err(|e| file_err(file, e))?;
    rt.block_on(async {
        let got = location
            .store
            .get(path)
            .await
            .map_err(|e| file_err(file, e))?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| file_err(file, e))?;
            tmp.write_all(&chunk).map_err(|e| file_err(file, e))?;
        }
        Ok::<_, PrepareError>(())
    })?;
    tmp.flush().map_err(|e| file_err(file, e))?;
    Ok(tmp)
}

fn read_text(
    file: &InputFile,
    mut reader: impl Read,
    sink: &mut dyn FnMut(Record) -> Result<(), PrepareError>,
) -> Result<(), PrepareError> {
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| file_err(file, e))?;
    // Gutenberg and other old corpora are not always valid UTF-8: replace, never fail.
    sink(Record::Doc(String::from_utf8_lossy(&bytes).into_owned()))
}

fn read_jsonl(
    file: &InputFile,
    reader: impl Read,
    compression: Compression,
    text_key: &str,
    sink: &mut dyn FnMut(Record) -> Result<(), PrepareError>,
) -> Result<(), PrepareError> {
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(reader).map_err(|e| file_err(file, e))?)
        }
    };
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| file_err(file, e))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Record::Bad {
            row: format!("line {number}"),
            message,
        };
        let record = match serde_json::from_str::<serde_json::Value>(&text) {
            Err(e) => bad(format!("not JSON: {e}")),
            Ok(value) => match value.get(text_key) {
                Some(serde_json::Value::String(_)) => match value {
                    serde_json::Value::Object(mut map) => match map.remove(text_key) {
                        Some(serde_json::Value::String(s)) => Record::Doc(s),
                        _ => unreachable!("checked above"),
                    },
                    _ => unreachable!("only objects have fields"),
                },
                Some(other) => bad(format!(
                    "field {text_key:?} is {}, expected a string",
                    kiln_proto::json::kind(other)
                )),
                None => bad(format!("no field {text_key:?}")),
            },
        };
        sink(record)?;
    }
}

/// The index of the text column, or why the file has none.
fn text_column(
    file: &InputFile,
    schema: &arrow_schema::Schema,
    text_key: &str,
) -> Result<usize, PrepareError> {
    let Some((index, field)) = schema.column_with_name(text_key) else {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(file_err(
            file,
            format!(
                "no column {text_key:?} (columns: {}); name the text column with --text-column",
                names.join(", ")
            ),
        ));
    };
    match field.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(index),
        other => Err(file_err(
            file,
            format!("column {text_key:?} has type {other}, expected a string"),
        )),
    }
}

/// Hands the rows of one batch's text column to `sink`; `row` is the file row of its first.
fn sink_batch(
    column: &dyn Array,
    text_key: &str,
    mut row: u64,
    sink: &mut dyn FnMut(Record) -> Result<(), PrepareError>,
) -> Result<(), PrepareError> {
    let mut emit = |value: Option<&str>| {
        let record = match value {
            Some(s) => Record::Doc(s.to_owned()),
            None => Record::Bad {
                row: format!("row {row}"),
                message: format!("the {text_key:?} value is null"),
            },
        };
        row += 1;
        sink(record)
    };
    match column.data_type() {
        DataType::Utf8 => column.as_string::<i32>().iter().try_for_each(&mut emit),
        DataType::LargeUtf8 => column.as_string::<i64>().iter().try_for_each(&mut emit),
        _ => column.as_string_view().iter().try_for_each(&mut emit),
    }
}

fn read_parquet(
    file: &InputFile,
    path: &Path,
    text_key: &str,
    bytes: &Arc<AtomicU64>,
    sink: &mut dyn FnMut(Record) -> Result<(), PrepareError>,
) -> Result<(), PrepareError> {
    let f = File::open(path).map_err(|e| file_err(file, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| file_err(file, e))?;
    let column = text_column(file, builder.schema(), text_key)?;
    let metadata = builder.metadata().clone();
    let mask = ProjectionMask::roots(builder.parquet_schema(), [column]);
    let mut builder = Some(builder.with_projection(mask));
    let mut row = 0u64;
    for rg in 0..metadata.num_row_groups() {
        // One row group at a time: a file is never in memory whole.
        let b = match builder.take() {
            Some(b) => b,
            None => {
                let f = File::open(path).map_err(|e| file_err(file, e))?;
                let b =
                    ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| file_err(file, e))?;
                let mask = ProjectionMask::roots(b.parquet_schema(), [column]);
                b.with_projection(mask)
            }
        };
        let reader = b
            .with_row_groups(vec![rg])
            .build()
            .map_err(|e| file_err(file, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| file_err(file, format!("row group {rg}: {e}")))?;
            sink_batch(batch.column(0).as_ref(), text_key, row, sink)?;
            row += batch.num_rows() as u64;
        }
        bytes.fetch_add(
            metadata.row_group(rg).compressed_size().max(0) as u64,
            Ordering::Relaxed,
        );
    }
    Ok(())
}
