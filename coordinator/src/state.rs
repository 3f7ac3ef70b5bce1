//! The coordinator's state, kept in an object store (a local directory by default) so a
//! coordinator killed at any moment and started again picks its jobs up.
//!
//! Each change is a new object `state/v{N:020}.json` written with a conditional put
//! (`PutMode::Create`): it succeeds only if no object of that name exists. A write is
//! therefore whole or absent, never torn, and a second coordinator on the same state
//! (whose versions would collide) is refused instead of silently overwriting the first's.
//! Reading takes the newest version that parses; the two before it are kept, older ones
//! deleted.

use futures::TryStreamExt;
use kiln_store::{self as store, StoreLocation};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::machine::Persisted;

const DIR: &str = "state";
const KEEP: u64 = 3;

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
        "state store {url}: version {version} was written by another coordinator; two coordinators must not share one state store"
    )]
    Fenced { url: String, version: u64 },
}

pub struct StateStore {
    loc: StoreLocation,
    version: u64,
}

impl StateStore {
    /// Opens the state under `url` and reads its newest version, if any.
    pub async fn open(url: &str) -> Result<(Self, Option<Persisted>), StateError> {
        let loc = store::open(url)?;
        if let Some(dir) = &loc.local_dir {
            let path = dir.join(DIR);
            std::fs::create_dir_all(&path).map_err(|source| StateError::Create { path, source })?;
        }
        let mut s = StateStore { loc, version: 0 };
        let mut versions = s.versions().await?;
        versions.sort_unstable();
        s.version = versions.last().copied().unwrap_or(0);
        for &v in versions.iter().rev() {
            match s.read(v).await {
                Ok(p) => return Ok((s, Some(p))),
                Err(e) => tracing::warn!("skipping state version {v}: {e}"),
            }
        }
        Ok((s, None))
    }

    pub fn url(&self) -> &str {
        &self.loc.url
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    fn name(&self, version: u64) -> Path {
        self.loc.child(&format!("{DIR}/v{version:020}.json"))
    }

    fn io(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Io {
            url: self.loc.url.clone(),
            message: e.to_string(),
        }
    }

    async fn versions(&self) -> Result<Vec<u64>, StateError> {
        let prefix = self.loc.child(DIR);
        let listed: Vec<_> = self
            .loc
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.io(e))?;
        Ok(listed
            .iter()
            .filter_map(|o| {
                let name = o.location.filename()?;
                name.strip_prefix('v')?.strip_suffix(".json")?.parse().ok()
            })
            .collect())
    }

    async fn read(&self, version: u64) -> Result<Persisted, StateError> {
        let bytes = self
            .loc
            .store
            .get(&self.name(version))
            .await
            .map_err(|e| self.io(e))?
            .bytes()
            .await
            .map_err(|e| self.io(e))?;
        serde_json::from_slice(&bytes).map_err(|e| self.io(format!("version {version}: {e}")))
    }

    /// Writes `state` as the next version.
    pub async fn save(&mut self, state: &Persisted) -> Result<(), StateError> {
        let next = self.version + 1;
        let bytes = serde_json::to_vec(state).map_err(|e| self.io(e))?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .loc
            .store
            .put_opts(&self.name(next), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                return Err(StateError::Fenced {
                    url: self.loc.url.clone(),
                    version: next,
                })
            }
            Err(e) => return Err(self.io(e)),
        }
        self.version = next;
        if next > KEEP {
            // Best effort: an old version left behind is only clutter.
            let _ = self.loc.store.delete(&self.name(next - KEEP)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(next_job: u64) -> Persisted {
        Persisted {
            next_job,
            jobs: Vec::new(),
        }
    }

    #[tokio::test]
    async fn versions_are_read_back_and_a_second_writer_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().to_str().unwrap();
        let (mut first, nothing) = StateStore::open(url).await.unwrap();
        assert!(nothing.is_none());
        for n in 1..=5 {
            first.save(&state(n)).await.unwrap();
        }
        // A restarted coordinator reads the newest version; older ones beyond three are gone.
        let (mut second, read) = StateStore::open(url).await.unwrap();
        assert_eq!(read, Some(state(5)));
        assert_eq!(second.version(), 5);
        let mut kept = second.versions().await.unwrap();
        kept.sort_unstable();
        assert_eq!(kept, vec![3, 4, 5]);
        // Two coordinators on one state: whoever writes a version second is refused, and
        // the first one's version stands.
        second.save(&state(6)).await.unwrap();
        let err = first.save(&state(60)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("version 6 was written by another coordinator"),
            "{err}"
        );
        let (_, read) = StateStore::open(url).await.unwrap();
        assert_eq!(read, Some(state(6)));
    }

    #[tokio::test]
    async fn a_torn_newest_version_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().to_str().unwrap();
        let (mut s, _) = StateStore::open(url).await.unwrap();
        s.save(&state(1)).await.unwrap();
        std::fs::write(
            dir.path().join("state").join(format!("v{:020}.json", 2)),
            b"{\"next_job\": 2, \"jo",
        )
        .unwrap();
        let (s, read) = StateStore::open(url).await.unwrap();
        assert_eq!(read, Some(state(1)));
        // The next write does not reuse the damaged version's name.
        assert_eq!(s.version(), 2);
    }
}
