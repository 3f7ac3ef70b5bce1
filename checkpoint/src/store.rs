//! Checkpoints in an object store: writing a rank's object and its confirmation, the commit
//! that makes a checkpoint exist, listing, reading regions at any layout, verification and
//! retention. Blocking API; the async IO runs on a private runtime.

mod claim;
mod read;
mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::TryStreamExt;
use kiln_store::{self as store, StoreLocation};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use crate::layout::{
    parse_step_dir, report_name, step_dir, to_delete, CheckpointManifest, Mesh, ObjectInfo,
    TensorInfo, FORMAT, MANIFEST, VERSION,
};
use crate::CheckpointError;

pub use claim::Claim;
pub use write::{Fill, RankObjectWriter};

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// What a commit does with whatever else its `step-N/` folder holds (what a rank killed in
/// an earlier attempt at the same step left: an object, a confirmation, a cut-short upload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strays {
    /// Leave it: a rank of this attempt may still be writing, since nothing has said that
    /// every rank finished (ranks started by hand).
    Keep,
    /// Delete it: every rank of this attempt is known to have written its object (the
    /// coordinator's two-phase commit says so), so anything else is an earlier attempt's.
    Remove,
}

/// A directory of checkpoints (`step-N/` under one URL).
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    loc: StoreLocation,
    rt: Arc<tokio::runtime::Runtime>,
}

/// What `list` finds in one `step-N/` directory.
#[derive(Debug, Clone)]
pub enum Listed {
    /// A manifest that parses: the checkpoint exists (its objects are not read here).
    Committed(Box<CheckpointManifest>),
    /// No manifest (a save in progress, or one that never finished).
    Uncommitted,
    /// A manifest that cannot be used, and why.
    Invalid(String),
}

/// The outcome of checking every byte of a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub objects: usize,
    pub pieces: usize,
    pub bytes: u64,
}

impl CheckpointStore {
    /// Opens the checkpoint directory at `url` (any store URL Kiln reads datasets from).
    pub fn open(url: &str) -> Result<Self> {
        let loc = store::open(url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-ckpt")
            .enable_all()
            .build()
            .map_err(|e| CheckpointError::Io {
                object: url.to_owned(),
                message: format!("cannot start the IO runtime: {e}"),
            })?;
        Ok(CheckpointStore {
            loc,
            rt: Arc::new(rt),
        })
    }

    /// On the local file system, flush every object written (and its directory) to disk
    /// before it counts as written, so that a committed checkpoint survives a machine crash
    /// and not only a process crash. Other stores acknowledge writes once durable anyway.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        if self.loc.local_dir.is_some() {
            self.loc.store =
                Arc::new(object_store::local::LocalFileSystem::new().with_fsync(fsync));
        }
        self
    }

    pub fn url(&self) -> &str {
        &self.loc.url
    }

    fn path(&self, step: u64, name: &str) -> Path {
        self.loc.child(&format!("{}/{name}", step_dir(step)))
    }

    /// The object's URL, for messages.
    pub fn display(&self, step: u64, name: &str) -> String {
        self.loc.display(&format!("{}/{name}", step_dir(step)))
    }

    fn io(&self, step: u64, name: &str, e: object_store::Error) -> CheckpointError {
        CheckpointError::Io {
            object: self.display(step, name),
            message: e.to_string(),
        }
    }

    /// Commits step `step`: waits (up to `timeout`) until all `mesh.world` ranks have
    /// confirmed their objects, then writes the manifest. Until the manifest is written the
    /// checkpoint does not exist. With [`Strays::Remove`], what else the folder holds goes
    /// first.
    pub fn commit(
        &self,
        step: u64,
        mesh: Mesh,
        tensors: BTreeMap<String, TensorInfo>,
        train_state: serde_json::Value,
        timeout: Duration,
        strays: Strays,
    ) -> Result<CheckpointManifest> {
        let deadline = Instant::now() + timeout;
        let mut objects: Vec<Option<ObjectInfo>> = vec![None; mesh.world];
        loop {
            for (rank, slot) in objects.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let name = report_name(rank);
                match self.rt.block_on(async {
                    self.loc
                        .store
                        .get(&self.path(step, &name))
                        .await?
                        .bytes()
                        .await
                }) {
                    Ok(bytes) => {
                        let info: ObjectInfo = serde_json::from_slice(&bytes).map_err(|e| {
                            CheckpointError::Invalid {
                                object: self.display(step, &name),
                                message: e.to_string(),
                            }
                        })?;
                        *slot = Some(info);
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.io(step, &name, e)),
                }
            }
            let missing: Vec<usize> = (0..mesh.world).filter(|r| objects[*r].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(CheckpointError::Unconfirmed {
                    checkpoint: self.display(step, ""),
                    ranks: missing,
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if strays == Strays::Remove {
            // What a writer killed in an earlier attempt at this step left here is not part
            // of the checkpoint: it goes before the manifest makes the folder a checkpoint.
            let mut keep: BTreeSet<String> = (0..mesh.world).map(report_name).collect();
            keep.extend(objects.iter().flatten().map(|o| o.name.clone()));
            let removed = self.remove_strays(step, &keep)?;
            if !removed.is_empty() {
                tracing::warn!(
                    "{}: removed what an earlier attempt left: {}",
                    self.display(step, ""),
                    removed.join(", ")
                );
            }
        }
        let manifest = CheckpointManifest {
            format: FORMAT.into(),
            version: VERSION,
            step,
            created_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            mesh,
            train_state,
            tensors,
            objects: objects.into_iter().flatten().collect(),
        };
        let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        self.rt
            .block_on(
                self.loc
                    .store
                    .put(&self.path(step, MANIFEST), PutPayload::from(text)),
            )
            .map_err(|e| self.io(step, MANIFEST, e))?;
        Ok(manifest)
    }

    /// Deletes what `step-N/` holds besides `keep` (and its manifest): the objects and
    /// confirmations of ranks an earlier generation had and this one does not, and, on a
    /// file system, the staging files (`NAME#N`) of uploads cut short, which a listing does
    /// not show. Returns their names.
    fn remove_strays(&self, step: u64, keep: &BTreeSet<String>) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for path in self.step_objects(step)? {
            let name = path.filename().unwrap_or_default().to_owned();
            if name == MANIFEST || keep.contains(&name) {
                continue;
            }
            self.delete_object(step, &path)?;
            removed.push(name);
        }
        if let Some(dir) = &self.loc.local_dir {
            let dir = dir.join(step_dir(step));
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let staged = name
                    .rsplit_once('#')
                    .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
                if staged && std::fs::remove_file(entry.path()).is_ok() {
                    removed.push(name);
                }
            }
        }
        Ok(removed)
    }

    /// Every object in `step-N/`.
    fn step_objects(&self, step: u64) -> Result<Vec<Path>> {
        let prefix = self.loc.child(&step_dir(step));
        self.rt
            .block_on(
                self.loc
                    .store
                    .list(Some(&prefix))
                    .map_ok(|o| o.location)
                    .try_collect(),
            )
            .map_err(|e| self.io(step, "", e))
    }

    /// Deletes one object of `step-N/`; one already gone is no error.
    fn delete_object(&self, step: u64, path: &Path) -> Result<()> {
        match self.rt.block_on(self.loc.store.delete(path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.io(step, path.filename().unwrap_or_default(), e)),
        }
    }

    /// Every `step-N/` directory, oldest first, with what it holds.
    pub fn list(&self) -> Result<Vec<(u64, Listed)>> {
        let listing = self
            .rt
            .block_on(self.loc.store.list_with_delimiter(Some(&self.loc.prefix)))
            .map_err(|e| CheckpointError::Io {
                object: self.loc.url.clone(),
                message: e.to_string(),
            })?;
        let mut steps: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(parse_step_dir))
            .collect();
        steps.sort_unstable();
        let mut out = Vec::new();
        for step in steps {
            if let Some(l) = self.listed(step)? {
                out.push((step, l));
            }
        }
        Ok(out)
    }

    fn listed(&self, step: u64) -> Result<Option<Listed>> {
        let listed = match self.manifest(step) {
            Ok(m) => Listed::Committed(Box::new(m)),
            Err(CheckpointError::NoManifest { .. }) => {
                // An empty directory (a file system's leftover) holds nothing at all.
                let prefix = self.loc.child(&step_dir(step));
                let any = self
                    .rt
                    .block_on(self.loc.store.list(Some(&prefix)).try_next())
                    .map_err(|e| self.io(step, "", e))?;
                if any.is_none() {
                    return Ok(None);
                }
                Listed::Uncommitted
            }
            Err(CheckpointError::Invalid { message, .. }) => Listed::Invalid(message),
            Err(e) => return Err(e),
        };
        Ok(Some(listed))
    }

    /// The committed checkpoints, newest first.
    pub fn committed(&self) -> Result<Vec<CheckpointManifest>> {
        let mut out: Vec<CheckpointManifest> = self
            .list()?
            .into_iter()
            .filter_map(|(_, l)| match l {
                Listed::Committed(m) => Some(*m),
                _ => None,
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    /// Step `step`'s manifest, checked for format and version.
    pub fn manifest(&self, step: u64) -> Result<CheckpointManifest> {
        let got = self.rt.block_on(async {
            self.loc
                .store
                .get(&self.path(step, MANIFEST))
                .await?
                .bytes()
                .await
        });
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CheckpointError::NoManifest {
                    checkpoint: self.display(step, ""),
                })
            }
            Err(e) => return Err(self.io(step, MANIFEST, e)),
        };
        let invalid = |message: String| CheckpointError::Invalid {
            object: self.display(step, MANIFEST),
            message,
        };
        let m: CheckpointManifest =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if m.format != FORMAT {
            return Err(invalid(format!("format {:?}, not {FORMAT:?}", m.format)));
        }
        if m.version != VERSION {
            return Err(invalid(format!(
                "format version {}; this Kiln reads version {VERSION}",
                m.version
            )));
        }
        if m.step != step {
            return Err(invalid(format!(
                "says step {} in {}",
                m.step,
                step_dir(step)
            )));
        }
        Ok(m)
    }

    /// Checks that every object of `m` is there at its recorded size (a truncated or
    /// missing shard is caught before anything is read).
    pub fn check_sizes(&self, m: &CheckpointManifest) -> Result<()> {
        for o in &m.objects {
            let meta = self
                .rt
                .block_on(self.loc.store.head(&self.path(m.step, &o.name)))
                .map_err(|e| match e {
                    object_store::Error::NotFound { .. } => CheckpointError::Damaged {
                        object: self.display(m.step, &o.name),
                        message: "it is missing".into(),
                    },
                    e => self.io(m.step, &o.name, e),
                })?;
            if meta.size != o.size {
                return Err(CheckpointError::Damaged {
                    object: self.display(m.step, &o.name),
                    message: format!(
                        "it is {} bytes, the manifest says {} (truncated or overwritten)",
                        meta.size, o.size
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads every piece of checkpoint `step` whole and checks its CRC.
    pub fn verify(&self, step: u64) -> Result<Verified> {
        let m = self.manifest(step)?;
        self.check_sizes(&m)?;
        let mut v = Verified::default();
        for o in &m.objects {
            let path = self.path(step, &o.name);
            for p in &o.pieces {
                let bytes = self
                    .rt
                    .block_on(self.loc.store.get_range(&path, p.bytes.clone()))
                    .map_err(|e| self.io(step, &o.name, e))?;
                let crc = crc32fast::hash(&bytes);
                if crc != p.crc32 {
                    return Err(CheckpointError::Damaged {
                        object: self.display(step, &o.name),
                        message: format!(
                            "its bytes {:?} ({}) have CRC-32 {crc:08x}, the manifest says {:08x}",
                            p.bytes, p.region.tensor, p.crc32
                        ),
                    });
                }
                v.pieces += 1;
                v.bytes += bytes.len() as u64;
            }
            v.objects += 1;
        }
        Ok(v)
    }

    /// Deletes checkpoint `step`: the manifest first, so that a deletion cut short leaves
    /// an uncommitted directory, never a damaged checkpoint.
    pub fn delete(&self, step: u64) -> Result<()> {
        self.delete_object(step, &self.path(step, MANIFEST))?;
        for path in self.step_objects(step)? {
            self.delete_object(step, &path)?;
        }
        // A file system keeps the emptied directory; a store has nothing left to remove.
        if let Some(dir) = &self.loc.local_dir {
            let _ = std::fs::remove_dir(dir.join(step_dir(step)));
        }
        Ok(())
    }

    /// Writes (replaces) the object `name` at the top of the checkpoint directory, beside the
    /// `step-N/` directories: the run's metrics log, for one.
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.loc.child(name);
        let store = self.loc.store.clone();
        self.rt
            .block_on(store.put(&path, bytes.into()))
            .map(|_| ())
            .map_err(|e| CheckpointError::Io {
                object: self.loc.display(name),
                message: e.to_string(),
            })
    }

    /// After committing `newest`: deletes the committed checkpoints retention does not keep
    /// and the uncommitted directories older than `newest` (saves that never finished).
    /// Returns the steps deleted.
    pub fn retain(&self, newest: u64, keep_last: usize, keep_every: u64) -> Result<Vec<u64>> {
        let listed = self.list()?;
        let committed: Vec<u64> = listed
            .iter()
            .filter(|(_, l)| matches!(l, Listed::Committed(_)))
            .map(|(s, _)| *s)
            .collect();
        let mut gone = to_delete(&committed, keep_last, keep_every);
        gone.extend(
            listed
                .iter()
                .filter(|(s, l)| *s < newest && !matches!(l, Listed::Committed(_)))
                .map(|(s, _)| *s),
        );
        gone.sort_unstable();
        for step in &gone {
            self.delete(*step)?;
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests;
