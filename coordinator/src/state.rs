//! The coordinator's state, kept in an object store (a local directory by default) so a
//! coordinator killed at any moment and started again picks its jobs up.
//!
//! A change costs what changed, not the whole state. Under `STATE/state/`:
//!
//! ```text
//! head/v{N:020}.json        {"next_job": ...}: written when a job is submitted
//! jobs/{id}/spec.json       the job as submitted (its job file included): written once
//! jobs/{id}/v{M:020}.json   the job's record without its spec: a new version at each change
//! ```
//!
//! Each version is a new object written with a conditional put (`PutMode::Create`): it
//! succeeds only if no object of that name exists. A write is therefore whole or absent,
//! never torn, and a second coordinator on the same state (whose versions would collide) is
//! refused instead of silently overwriting the first's. Reading takes the newest version
//! that parses; the one before it is kept, older ones deleted. A job dropped after its
//! retention ([`crate::machine::Policy::retain_finished_s`]) has its folder deleted.
//!
//! State written before this layout (`state/v{N}.json`, the whole state in each version)
//! is read once and rewritten in it.

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt;
use kiln_store::{self as store, StoreLocation};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::machine::{Changes, Job, Machine, Persisted};

const DIR: &str = "state";
/// Versions kept of the head and of each job: the newest, and the one before it in case
/// the newest is damaged.
const KEEP: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Open(#[from] store::StoreError),
    #[error("cannot create the state directory {path}: {source}")]
    Create {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("state store {url}: {message}")]
    Io { url: String, message: String },
    #[error(
        "state store {url}: {object} was written by another coordinator; two coordinators must not share one state store"
    )]
    Fenced { url: String, object: String },
}

pub struct StateStore {
    loc: StoreLocation,
    /// The head's newest version.
    version: u64,
    /// Each stored job's newest record version.
    jobs: HashMap<String, u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Head {
    next_job: u64,
}

/// What one listing of `state/` found.
#[derive(Default)]
struct Listing {
    head: Vec<u64>,
    legacy: Vec<u64>,
    /// Per job: whether its spec exists, and its record versions.
    jobs: BTreeMap<String, (bool, Vec<u64>)>,
}

fn version_of(name: &str) -> Option<u64> {
    name.strip_prefix('v')?.strip_suffix(".json")?.parse().ok()
}

impl StateStore {
    /// Opens the state under `url` and reads it, if there is any.
    pub async fn open(url: &str) -> Result<(Self, Option<Persisted>), StateError> {
        let loc = store::open(url)?;
        if let Some(dir) = &loc.local_dir {
            let path = dir.join(DIR);
            std::fs::create_dir_all(&path).map_err(|source| StateError::Create { path, source })?;
        }
        let mut s = StateStore {
            loc,
            version: 0,
            jobs: HashMap::new(),
        };
        let listing = s.list().await?;
        if listing.head.is_empty() && listing.jobs.is_empty() {
            if listing.legacy.is_empty() {
                return Ok((s, None));
            }
            return s.migrate(listing.legacy).await;
        }
        let mut next_job = 0;
        s.version = listing.head.iter().copied().max().unwrap_or(0);
        for &v in listing.head.iter().rev() {
            match s.read::<Head>(&s.head_name(v)).await {
                Ok(head) => {
                    next_job = head.next_job;
                    break;
                }
                Err(e) => tracing::warn!("skipping state head version {v}: {e}"),
            }
        }
        // No job number found in the store is handed out again, not even one whose state
        // was not completely written (its spec would then collide with the new job's).
        let numbered = listing
            .jobs
            .keys()
            .filter_map(|id| id.rsplit_once('-')?.1.parse::<u64>().ok());
        next_job = numbered.fold(next_job, u64::max);
        let mut jobs = Vec::new();
        for (id, (has_spec, versions)) in listing.jobs {
            if let Some(v) = versions.iter().copied().max() {
                s.jobs.insert(id.clone(), v);
            }
            if !has_spec || versions.is_empty() {
                // Submitted while the coordinator died: the submission was never answered.
                tracing::warn!("skipping job {id}: its state was not completely written");
                continue;
            }
            match s.read_job(&id, &versions).await {
                Ok(job) => jobs.push(job),
                Err(e) => tracing::warn!("skipping job {id}: {e}"),
            }
        }
        Ok((s, Some(Persisted { next_job, jobs })))
    }

    pub fn url(&self) -> &str {
        &self.loc.url
    }

    /// The head's version: how many times a job was submitted on this state (since the
    /// older versions were deleted, not how many objects there are).
    pub fn version(&self) -> u64 {
        self.version
    }

    fn head_name(&self, version: u64) -> Path {
        self.loc.child(&format!("{DIR}/head/v{version:020}.json"))
    }

    fn legacy_name(&self, version: u64) -> Path {
        self.loc.child(&format!("{DIR}/v{version:020}.json"))
    }

    fn spec_name(&self, id: &str) -> Path {
        self.loc.child(&format!("{DIR}/jobs/{id}/spec.json"))
    }

    fn job_name(&self, id: &str, version: u64) -> Path {
        self.loc
            .child(&format!("{DIR}/jobs/{id}/v{version:020}.json"))
    }

    fn io(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Io {
            url: self.loc.url.clone(),
            message: e.to_string(),
        }
    }

    /// Every object under `prefix`.
    async fn objects(&self, prefix: &Path) -> Result<Vec<ObjectMeta>, StateError> {
        self.loc
            .store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| self.io(e))
    }

    async fn list(&self) -> Result<Listing, StateError> {
        let prefix = self.loc.child(DIR);
        let listed = self.objects(&prefix).await?;
        let mut listing = Listing::default();
        for object in listed {
            let Some(rest) = object.location.prefix_match(&prefix) else {
                continue;
            };
            let parts: Vec<String> = rest.map(|p| p.as_ref().to_owned()).collect();
            match parts.as_slice() {
                [name] => listing.legacy.extend(version_of(name)),
                [head, name] if head == "head" => listing.head.extend(version_of(name)),
                [jobs, id, name] if jobs == "jobs" => {
                    let entry = listing.jobs.entry(id.clone()).or_default();
                    if name == "spec.json" {
                        entry.0 = true;
                    } else {
                        entry.1.extend(version_of(name));
                    }
                }
                _ => {}
            }
        }
        listing.head.sort_unstable();
        listing.legacy.sort_unstable();
        for (_, versions) in listing.jobs.values_mut() {
            versions.sort_unstable();
        }
        Ok(listing)
    }

    async fn read<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T, StateError> {
        let bytes = self
            .loc
            .store
            .get(path)
            .await
            .map_err(|e| self.io(e))?
            .bytes()
            .await
            .map_err(|e| self.io(e))?;
        serde_json::from_slice(&bytes).map_err(|e| self.io(format!("{path}: {e}")))
    }

    /// A job from its spec and its newest record that parses (`versions` ascending).
    async fn read_job(&self, id: &str, versions: &[u64]) -> Result<Job, StateError> {
        let spec: serde_json::Value = self.read(&self.spec_name(id)).await?;
        let mut last = None;
        for &v in versions.iter().rev() {
            match self.read::<serde_json::Value>(&self.job_name(id, v)).await {
                Ok(mut record) => {
                    if let Some(fields) = record.as_object_mut() {
                        fields.insert("spec".into(), spec);
                    }
                    return serde_json::from_value(record)
                        .map_err(|e| self.io(format!("job {id} version {v}: {e}")));
                }
                Err(e) => {
                    tracing::warn!("skipping job {id}'s version {v}: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| self.io(format!("job {id} has no record"))))
    }

    /// Puts `bytes` at `path` only if nothing is there yet.
    async fn create(&self, path: &Path, bytes: Vec<u8>) -> Result<(), StateError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .loc
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StateError::Fenced {
                url: self.loc.url.clone(),
                object: path.to_string(),
            }),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Writes what `changes` names of `machine`'s state: each changed job's record (and a
    /// new job's spec), the head when a job was submitted, and deletes dropped jobs.
    pub async fn save(&mut self, machine: &Machine, changes: &Changes) -> Result<(), StateError> {
        for id in &changes.jobs {
            if let Some(job) = machine.jobs.get(id) {
                self.save_job(job).await?;
            }
        }
        if changes.head {
            self.save_head(machine.next_job).await?;
        }
        for id in &changes.dropped {
            self.drop_job(id).await?;
        }
        Ok(())
    }

    /// Writes `bytes` as the version after `newest` of the object `name` names, and deletes
    /// the version [`KEEP`] before it (best effort: an old version left behind is only
    /// clutter). Returns the new version.
    async fn put_version(
        &self,
        name: impl Fn(u64) -> Path,
        newest: u64,
        bytes: Vec<u8>,
    ) -> Result<u64, StateError> {
        let next = newest + 1;
        self.create(&name(next), bytes).await?;
        if next > KEEP {
            let _ = self.loc.store.delete(&name(next - KEEP)).await;
        }
        Ok(next)
    }

    async fn save_head(&mut self, next_job: u64) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(&Head { next_job }).map_err(|e| self.io(e))?;
        self.version = self
            .put_version(|v| self.head_name(v), self.version, bytes)
            .await?;
        Ok(())
    }

    async fn save_job(&mut self, job: &Job) -> Result<(), StateError> {
        let known = self.jobs.get(&job.id).copied();
        if known.is_none() {
            let spec = serde_json::to_vec(&job.spec).map_err(|e| self.io(e))?;
            self.create(&self.spec_name(&job.id), spec).await?;
        }
        let mut record = serde_json::to_value(job).map_err(|e| self.io(e))?;
        if let Some(fields) = record.as_object_mut() {
            fields.remove("spec");
        }
        let bytes = serde_json::to_vec(&record).map_err(|e| self.io(e))?;
        let next = self
            .put_version(|v| self.job_name(&job.id, v), known.unwrap_or(0), bytes)
            .await?;
        self.jobs.insert(job.id.clone(), next);
        Ok(())
    }

    async fn drop_job(&mut self, id: &str) -> Result<(), StateError> {
        let prefix = self.loc.child(&format!("{DIR}/jobs/{id}"));
        for object in self.objects(&prefix).await? {
            match self.loc.store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        if let Some(dir) = &self.loc.local_dir {
            // The local store leaves the emptied folder behind.
            let _ = std::fs::remove_dir(dir.join(DIR).join("jobs").join(id));
        }
        self.jobs.remove(id);
        Ok(())
    }

    /// Reads the newest whole-state version of the older layout, writes it in this one and
    /// deletes the old versions.
    async fn migrate(mut self, legacy: Vec<u64>) -> Result<(Self, Option<Persisted>), StateError> {
        let mut found = None;
        for &v in legacy.iter().rev() {
            match self.read::<Persisted>(&self.legacy_name(v)).await {
                Ok(p) => {
                    found = Some(p);
                    break;
                }
                Err(e) => tracing::warn!("skipping state version {v}: {e}"),
            }
        }
        let Some(state) = found else {
            return Ok((self, None));
        };
        for job in &state.jobs {
            self.save_job(job).await?;
        }
        self.save_head(state.next_job).await?;
        for v in legacy {
            let _ = self.loc.store.delete(&self.legacy_name(v)).await;
        }
        tracing::info!(
            "rewrote the state in {} as one object per job ({} jobs)",
            self.loc.url,
            state.jobs.len()
        );
        Ok((self, Some(state)))
    }
}

#[cfg(test)]
mod tests;
