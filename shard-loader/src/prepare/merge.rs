//! The records a preparation leaves under `parts/`, and the merge that turns them into the
//! manifest.
//!
//! - `parts/plan.json`: the inputs (names and sizes), how they are cut into units, and every
//!   option that changes the dataset. Each part computes it and checks it against the one
//!   there, so parts started with different arguments cannot mix.
//! - `parts/unit-UUUUU.json`: a finished unit: its shards (as in the manifest) and counts,
//!   tied to the plan by its SHA-256. Written after the unit's shards are complete.
//! - `parts/unit-UUUUU.hashes` (`--dedup exact`): the unit's documents as 24-byte records,
//!   the id (u64, little-endian) and the first 16 bytes of the text's SHA-256.
//! - `parts/merge.lock`: held by the part writing the manifest.
//!
//! The plan and the unit records stay beside the manifest (a few kilobytes a unit): they
//! say how the dataset was made. The hashes are deleted once the manifest is written.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use kiln_proto::manifest::{self, DatasetManifest, Prepared, Split, TokenizerInfo};
use object_store::{ObjectStoreExt, PutMode, PutOptions};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use super::input::InputFile;
use super::{Dedup, PrepareError, PrepareOptions};
use crate::shard::{self, ShardTokens, ShardWriter};
use crate::tokenizer::{hex, Tokenizer};
use kiln_store::{self as store, StoreLocation};

pub(crate) const PLAN: &str = "parts/plan.json";
pub(crate) const LOCK: &str = "parts/merge.lock";
const PLAN_FORMAT: &str = "kiln-prepare-plan";

pub(crate) fn unit_name(u: usize) -> String {
    format!("parts/unit-{u:05}.json")
}

pub(crate) fn hashes_name(u: usize) -> String {
    format!("parts/unit-{u:05}.hashes")
}

/// Reads and writes the objects of one output location.
pub(crate) struct Io<'a> {
    pub location: &'a StoreLocation,
    pub rt: &'a Handle,
}

impl<'a> Io<'a> {
    pub fn new(location: &'a StoreLocation, rt: &'a Handle) -> Self {
        Io { location, rt }
    }

    fn store_err(&self, name: &str, e: impl std::fmt::Display) -> PrepareError {
        PrepareError::Upload {
            name: self.location.display(name),
            message: e.to_string(),
        }
    }

    fn reach_err(&self, name: &str, e: impl std::fmt::Display) -> PrepareError {
        PrepareError::Reach {
            name: self.location.display(name),
            message: e.to_string(),
        }
    }

    pub fn exists(&self, name: &str) -> Result<bool, PrepareError> {
        let key = self.location.child(name);
        match self.rt.block_on(self.location.store.head(&key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.reach_err(name, e)),
        }
    }

    pub fn delete(&self, name: &str) -> Result<(), PrepareError> {
        let key = self.location.child(name);
        match self.rt.block_on(self.location.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.reach_err(name, e)),
        }
    }

    pub fn read(&self, name: &str) -> Result<Option<bytes::Bytes>, PrepareError> {
        let key = self.location.child(name);
        let got = self.rt.block_on(async {
            match self.location.store.get(&key).await {
                Ok(g) => g.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map_err(|e| self.reach_err(name, e))
    }

    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, PrepareError> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| PrepareError::Record {
                name: self.location.display(name),
                message: e.to_string(),
            })
    }

    /// Writes an object whole: readers see the old one or the new one, never a part.
    pub fn write(&self, name: &str, body: Vec<u8>) -> Result<(), PrepareError> {
        if let Some(dir) = &self.location.local_dir {
            let path = dir.join(name);
            let write_err = |path: &Path| {
                let path = path.to_owned();
                move |source| PrepareError::Write { path, source }
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(write_err(parent))?;
            }
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            std::fs::write(&tmp, body).map_err(write_err(&tmp))?;
            return std::fs::rename(&tmp, &path).map_err(write_err(&path));
        }
        let key = self.location.child(name);
        self.rt
            .block_on(self.location.store.put(&key, body.into()))
            .map(|_| ())
            .map_err(|e| self.store_err(name, e))
    }

    /// Creates an object only if it does not exist; `false` when it does.
    pub fn create_new(&self, name: &str, body: Vec<u8>) -> Result<bool, PrepareError> {
        if let Some(dir) = &self.location.local_dir {
            use std::io::Write;
            let path = dir.join(name);
            let write_err = |source| PrepareError::Write {
                path: path.clone(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(write_err)?;
            }
            return match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => f.write_all(&body).map(|()| true).map_err(write_err),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(write_err(e)),
            };
        }
        let key = self.location.child(name);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .rt
            .block_on(self.location.store.put_opts(&key, body.into(), opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.store_err(name, e)),
        }
    }

    /// Where a shard named `name` is written before it is in the store: the dataset
    /// directory itself, or `staging` for a remote store.
    pub fn local_path(&self, name: &str, staging: &Path) -> PathBuf {
        match &self.location.local_dir {
            Some(dir) => dir.join(name),
            None => staging.join(name),
        }
    }

    /// Uploads a shard written at [`Io::local_path`] (nothing to do for a local directory).
    pub fn publish(&self, name: &str, local: &Path) -> Result<(), PrepareError> {
        if self.location.local_dir.is_some() {
            return Ok(());
        }
        self.rt.block_on(upload(self.location, name, local))?;
        // The staged copy is not needed once the store has it.
        let _ = std::fs::remove_file(local);
        Ok(())
    }

    fn read_shard(&self, name: &str, vocab_size: u32) -> Result<ShardTokens, PrepareError> {
        if let Some(dir) = &self.location.local_dir {
            return Ok(shard::read_shard(&dir.join(name), "tokens", vocab_size)?);
        }
        let bytes = self.read(name)?.ok_or_else(|| PrepareError::Input {
            name: self.location.display(name),
            message: "the shard a unit record names is missing".into(),
        })?;
        Ok(shard::read_parquet(
            bytes,
            &self.location.display(name),
            "tokens",
            vocab_size,
        )?)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PlannedFile {
    pub name: String,
    pub size: u64,
}

/// What decides the dataset: the inputs, their units, and the options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Plan {
    format: String,
    tokenizer: TokenizerInfo,
    vocab_size: u32,
    eos_id: u32,
    text_key: String,
    val_fraction: f64,
    shard_tokens: u64,
    pub row_group_tokens: u64,
    unit_bytes: u64,
    pub dedup: bool,
    pub units: Vec<Vec<PlannedFile>>,
}

impl Plan {
    pub fn new(options: &PrepareOptions, tokenizer: &Tokenizer, files: &[InputFile]) -> Self {
        let mut units: Vec<Vec<PlannedFile>> = Vec::new();
        let mut bytes = 0u64;
        for f in files {
            if units.is_empty() || bytes >= options.unit_bytes.max(1) {
                units.push(Vec::new());
                bytes = 0;
            }
            bytes += f.size;
            if let Some(u) = units.last_mut() {
                u.push(PlannedFile {
                    name: f.name.clone(),
                    size: f.size,
                });
            }
        }
        Plan {
            format: PLAN_FORMAT.into(),
            tokenizer: TokenizerInfo {
                kind: tokenizer.kind().into(),
                sha256: tokenizer.sha256().map(str::to_owned),
            },
            vocab_size: tokenizer.vocab_size(),
            eos_id: tokenizer.eos_id(),
            text_key: options.text_key.clone(),
            val_fraction: options.val_fraction,
            shard_tokens: options.shard_tokens.max(1),
            row_group_tokens: options.row_group_tokens.max(1) as u64,
            unit_bytes: options.unit_bytes.max(1),
            dedup: options.dedup == Dedup::Exact,
            units,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(self.to_json().as_bytes()))
    }

    /// Every k-th document of a unit is held out for validation.
    pub fn every(&self) -> u64 {
        every(self.val_fraction)
    }

    /// The input files of each unit, in order (`files` as the plan was made from).
    pub fn unit_files<'f>(&self, files: &'f [InputFile]) -> Vec<&'f [InputFile]> {
        let mut out = Vec::new();
        let mut start = 0;
        for unit in &self.units {
            out.push(&files[start..start + unit.len()]);
            start += unit.len();
        }
        out
    }

    /// The first thing that differs, for the message that refuses to mix two plans.
    pub fn difference(&self, new: &Plan) -> String {
        let old_json: serde_json::Value = serde_json::to_value(self).unwrap_or_default();
        let new_json: serde_json::Value = serde_json::to_value(new).unwrap_or_default();
        if let (Some(old), Some(new)) = (old_json.as_object(), new_json.as_object()) {
            for (key, value) in old {
                if key != "units" && new.get(key) != Some(value) {
                    return format!(
                        "{key} was {value}, now {}",
                        new.get(key).cloned().unwrap_or_default()
                    );
                }
            }
        }
        let old_files: Vec<&PlannedFile> = self.units.iter().flatten().collect();
        let new_files: Vec<&PlannedFile> = new.units.iter().flatten().collect();
        for (a, b) in old_files.iter().zip(&new_files) {
            if a != b {
                return format!(
                    "input {} ({} bytes) is now {} ({} bytes)",
                    a.name, a.size, b.name, b.size
                );
            }
        }
        format!(
            "{} input files then, {} now",
            old_files.len(),
            new_files.len()
        )
    }
}

pub(crate) fn every(val_fraction: f64) -> u64 {
    if val_fraction > 0.0 {
        (1.0 / val_fraction).round().max(2.0) as u64
    } else {
        u64::MAX
    }
}

/// A finished unit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct UnitRecord {
    /// The SHA-256 of the plan it belongs to.
    pub plan: String,
    pub unit: u64,
    pub input_files: u64,
    pub input_bytes: u64,
    pub train: Split,
    pub validation: Split,
    pub skipped_documents: u64,
    pub skipped_files: u64,
    /// Repeats of the unit's own documents (repeats across units are removed by the merge).
    pub duplicates_removed: u64,
}

impl UnitRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Whether any unit of `plan` is finished.
pub(crate) fn any_finished(io: &Io, plan: &Plan) -> Result<bool, PrepareError> {
    let sha = plan.sha256();
    for u in 0..plan.units.len() {
        if let Some(r) = io.read_json::<UnitRecord>(&unit_name(u))? {
            if r.plan == sha {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The unit records of a plan, or the note that says which are missing.
fn records(
    io: &Io,
    plan: &Plan,
    plan_sha: &str,
) -> Result<Result<Vec<UnitRecord>, (usize, String)>, PrepareError> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for u in 0..plan.units.len() {
        match io.read_json::<UnitRecord>(&unit_name(u))? {
            Some(r) if r.plan == plan_sha => found.push(r),
            _ => missing.push(u),
        }
    }
    if missing.is_empty() {
        return Ok(Ok(found));
    }
    let first: Vec<String> = missing
        .iter()
        .take(3)
        .map(|&u| {
            let name = plan.units[u].first().map_or("", |f| f.name.as_str());
            format!("unit {u}: {name}")
        })
        .collect();
    let more = if missing.len() > 3 { ", ..." } else { "" };
    Ok(Err((missing.len(), format!("{}{more}", first.join(", ")))))
}

/// Writes the manifest if every unit is finished and no other part is writing it; otherwise
/// says why not.
pub(crate) fn merge_if_complete(
    io: &Io,
    plan: &Plan,
    plan_sha: &str,
    progress: bool,
) -> Result<Result<DatasetManifest, String>, PrepareError> {
    let records = match records(io, plan, plan_sha)? {
        Ok(r) => r,
        Err((missing, _)) => {
            return Ok(Err(format!(
                "{missing} of {} units are not finished yet; the part that finishes last writes the manifest",
                plan.units.len()
            )))
        }
    };
    if !io.create_new(LOCK, std::process::id().to_string().into_bytes())? {
        return Ok(Err(format!(
            "another part is writing the manifest ({} exists; if no part is running, run `kiln data merge {}`)",
            io.location.display(LOCK),
            io.location.url
        )));
    }
    // Another part may have merged and let go of the lock before this one took it.
    if io.exists(manifest::FILE_NAME)? {
        io.delete(LOCK)?;
        return Ok(Err("another part wrote it".into()));
    }
    let result = write_manifest(io, plan, records, progress);
    io.delete(LOCK)?;
    result.map(Ok)
}

/// `kiln data merge`: writes the manifest of a preparation whose units are all finished.
pub fn merge(output: &str, progress: bool) -> Result<DatasetManifest, PrepareError> {
    let runtime = super::runtime()?;
    let location = store::open(output)?;
    let io = Io::new(&location, runtime.handle());
    if io.exists(manifest::FILE_NAME)? {
        return Err(PrepareError::Exists(output.to_owned()));
    }
    let plan: Plan = io.read_json(PLAN)?.ok_or_else(|| PrepareError::NoPlan {
        output: output.to_owned(),
        name: location.display(PLAN),
    })?;
    let plan_sha = plan.sha256();
    let records =
        records(&io, &plan, &plan_sha)?.map_err(|(missing, first)| PrepareError::Incomplete {
            output: output.to_owned(),
            missing,
            units: plan.units.len(),
            first,
        })?;
    let manifest = write_manifest(&io, &plan, records, progress)?;
    io.delete(LOCK)?;
    Ok(manifest)
}

fn write_manifest(
    io: &Io,
    plan: &Plan,
    records: Vec<UnitRecord>,
    progress: bool,
) -> Result<DatasetManifest, PrepareError> {
    let mut train = Split::default();
    let mut validation = Split::default();
    let mut prepared = Prepared {
        units: records.len() as u64,
        dedup: plan.dedup.then(|| "exact".into()),
        ..Default::default()
    };
    let mut seen: HashSet<[u8; 16]> = HashSet::new();
    let mut replaced = Vec::new();
    let staging = tempfile::tempdir().map_err(|source| PrepareError::Write {
        path: std::env::temp_dir(),
        source,
    })?;
    let bar = if progress && plan.dedup {
        indicatif::ProgressBar::new(records.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    for (u, mut r) in records.into_iter().enumerate() {
        prepared.input_files += r.input_files;
        prepared.input_bytes += r.input_bytes;
        prepared.skipped_documents += r.skipped_documents;
        prepared.skipped_files += r.skipped_files;
        prepared.duplicates_removed += r.duplicates_removed;
        if plan.dedup {
            let name = hashes_name(u);
            let hashes = io.read(&name)?.ok_or_else(|| PrepareError::Record {
                name: io.location.display(&name),
                message: "missing".into(),
            })?;
            let mut drop = HashSet::new();
            for rec in hashes.chunks_exact(24) {
                let id = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
                let hash: [u8; 16] = rec[8..].try_into().unwrap_or_default();
                if !seen.insert(hash) {
                    drop.insert(id);
                }
            }
            if !drop.is_empty() {
                prepared.duplicates_removed += drop.len() as u64;
                r.train = without(io, plan, &r.train, &drop, staging.path(), &mut replaced)?;
                r.validation = without(
                    io,
                    plan,
                    &r.validation,
                    &drop,
                    staging.path(),
                    &mut replaced,
                )?;
            }
            bar.inc(1);
        }
        for (all, part) in [(&mut train, r.train), (&mut validation, r.validation)] {
            all.documents += part.documents;
            all.tokens += part.tokens;
            all.shards.extend(part.shards);
        }
    }
    bar.finish_and_clear();
    if plan.val_fraction > 0.0 && validation.documents == 0 {
        return Err(PrepareError::EmptyValidation {
            documents: train.documents,
            units: prepared.units,
            fraction: plan.val_fraction,
            every: plan.every(),
        });
    }
    let manifest = DatasetManifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        tokenizer: plan.tokenizer.clone(),
        vocab_size: plan.vocab_size,
        eos_id: plan.eos_id,
        token_column: "tokens".into(),
        train,
        validation,
        prepared: Some(prepared),
    };
    io.write(manifest::FILE_NAME, manifest.to_json().into_bytes())?;
    // The shards the manifest no longer names, and the hashes only the merge needed.
    for name in replaced {
        io.delete(&name)?;
    }
    if plan.dedup {
        for u in 0..plan.units.len() {
            io.delete(&hashes_name(u))?;
        }
    }
    Ok(manifest)
}

/// `split` without the documents in `drop`: each shard that held one is written again.
fn without(
    io: &Io,
    plan: &Plan,
    split: &Split,
    drop: &HashSet<u64>,
    staging: &Path,
    replaced: &mut Vec<String>,
) -> Result<Split, PrepareError> {
    let mut out = Split::default();
    for info in &split.shards {
        let shard = io.read_shard(&info.path, plan.vocab_size)?;
        if !shard.doc_ids.iter().any(|d| drop.contains(d)) {
            out.documents += info.documents;
            out.tokens += info.tokens;
            out.shards.push(info.clone());
            continue;
        }
        replaced.push(info.path.clone());
        let name = format!("{}.dedup.parquet", info.path.trim_end_matches(".parquet"));
        let local = io.local_path(&name, staging);
        let mut writer = ShardWriter::create(&local, plan.row_group_tokens as usize)?;
        let mut kept = 0;
        for (i, id) in shard.doc_ids.iter().enumerate() {
            if !drop.contains(id) {
                writer.push(*id, &shard.tokens[shard.offsets[i]..shard.offsets[i + 1]])?;
                kept += 1;
            }
        }
        let summary = writer.finish()?;
        if kept == 0 {
            let _ = std::fs::remove_file(&local);
            continue;
        }
        io.publish(&name, &local)?;
        out.documents += summary.documents;
        out.tokens += summary.tokens;
        out.shards.push(super::unit::shard_info(name, summary));
    }
    Ok(out)
}

/// Streams a local file to the store in 8 MiB parts (a multipart upload where the store
/// has them), so large shards never sit in memory whole.
async fn upload(location: &StoreLocation, name: &str, local: &Path) -> Result<(), PrepareError> {
    use tokio::io::AsyncReadExt;
    let read_err = |source| PrepareError::Read {
        path: local.to_owned(),
        source,
    };
    let upload_err = |e: object_store::Error| PrepareError::Upload {
        name: location.display(name),
        message: e.to_string(),
    };
    let upload = location
        .store
        .put_multipart(&location.child(name))
        .await
        .map_err(upload_err)?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, 8 << 20);
    let mut file = tokio::fs::File::open(local).await.map_err(read_err)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            break;
        }
        writer.wait_for_capacity(4).await.map_err(upload_err)?;
        writer.write(&buf[..n]);
    }
    writer.finish().await.map_err(upload_err)?;
    Ok(())
}
