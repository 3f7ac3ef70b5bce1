//! A rank's claim on its checkpoint directory before it writes there (see
//! [`kiln_store::owner`]): refused while another run's holder is alive; the leader writes the
//! claim and rewrites it while it trains, and gives it up when the run ends well.

use std::sync::{Arc, Mutex};

use kiln_store::owner::{self, Found, Owner, OwnerTimes};

use super::CheckpointStore;
use crate::CheckpointError;

/// This process's claim; see [`CheckpointStore::claim`].
pub struct Claim {
    store: CheckpointStore,
    me: Owner,
    leader: bool,
    /// Set by the keeper when another run took the directory over.
    lost: Arc<Mutex<Option<Owner>>>,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl CheckpointStore {
    /// Claims this directory for `run` before anything is written to it. Refused, naming the
    /// holder, while a claim of another run is rewritten (watched for up to `times.expire`);
    /// a claim of this run, of an exited process of this host, or left unrenewed, is free.
    /// The `leader` (the run's rank 0) writes the claim and rewrites it every `times.renew`
    /// until the claim is dropped.
    pub fn claim(
        &self,
        run: &str,
        leader: bool,
        times: OwnerTimes,
    ) -> Result<Claim, CheckpointError> {
        let loc = self.loc.clone();
        let io = |e: object_store::Error| CheckpointError::Io {
            object: loc.display(owner::OWNER),
            message: e.to_string(),
        };
        let me = Owner::me(run);
        self.rt.block_on(async {
            // Twice at most: a claim created between the look and the write is looked at again.
            for _ in 0..2 {
                if let Found::Held(holder) = owner::look(&loc, run, times).await.map_err(io)? {
                    return Err(CheckpointError::Owned {
                        dir: self.url().to_owned(),
                        run: holder.describe(),
                        expire_s: times.expire.as_secs_f64(),
                    });
                }
                if !leader {
                    return Ok(());
                }
                match owner::read(&loc).await.map_err(io)? {
                    // This run's, or abandoned (as the look found): replaced.
                    Some(_) => {
                        owner::write(&loc, &me).await.map_err(io)?;
                        return Ok(());
                    }
                    None => {
                        if owner::create(&loc, &me).await.map_err(io)? {
                            return Ok(());
                        }
                    }
                }
            }
            Err(CheckpointError::Io {
                object: loc.display(owner::OWNER),
                message: "claimed by another run while this one claimed it".into(),
            })
        })?;
        let lost = Arc::new(Mutex::new(None));
        let keeper = leader.then(|| {
            let (loc, lost, mut me) = (self.loc.clone(), lost.clone(), me.clone());
            self.rt.spawn(async move {
                loop {
                    tokio::time::sleep(times.renew).await;
                    match owner::read(&loc).await {
                        Ok(Some(now)) if !now.same_process(&me) => {
                            *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
                            return;
                        }
                        // Unreadable now: tried again at the next renewal.
                        Err(_) => continue,
                        Ok(_) => {}
                    }
                    me.renewals += 1;
                    me.unix_s = owner::now();
                    let _ = owner::write(&loc, &me).await;
                }
            })
        });
        Ok(Claim {
            store: self.clone(),
            me,
            leader,
            lost,
            keeper,
        })
    }
}

impl Claim {
    /// `Err` once another run has taken the directory over: this one must stop writing.
    pub fn check(&self) -> Result<(), CheckpointError> {
        match &*self.lost.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(other) => Err(CheckpointError::TakenOver {
                dir: self.store.url().to_owned(),
                run: other.describe(),
            }),
            None => Ok(()),
        }
    }

    /// The run ended: the leader removes its claim, so that the next run need not wait for
    /// it to expire.
    pub fn release(mut self) -> Result<(), CheckpointError> {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        if !self.leader {
            return Ok(());
        }
        let loc = &self.store.loc;
        self.store
            .rt
            .block_on(owner::release(loc, &self.me))
            .map_err(|e| CheckpointError::Io {
                object: loc.display(owner::OWNER),
                message: e.to_string(),
            })
    }
}

impl Drop for Claim {
    /// Dropped without [`Claim::release`] (the run failed): the claim stays, unrenewed, and
    /// expires; a run started again by the same coordinator job takes it at once.
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn fast() -> OwnerTimes {
        OwnerTimes {
            renew: Duration::from_millis(100),
            expire: Duration::from_millis(600),
        }
    }

    fn open(dir: &std::path::Path) -> CheckpointStore {
        CheckpointStore::open(dir.to_str().unwrap()).unwrap()
    }

    #[test]
    fn a_live_run_keeps_its_directory_and_lets_only_its_own_ranks_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = store.claim("run a", true, fast()).unwrap();
        // Another run, leader or not, is refused, naming the holder.
        for leader in [true, false] {
            let err = store.claim("run b", leader, fast()).err().expect("refused");
            let text = err.to_string();
            assert!(
                text.contains("is being written by another run, run a")
                    && text.contains(&format!("pid {}", std::process::id())),
                "{text}"
            );
        }
        // A rank of the same run (another generation's, say) is let in at once.
        store.claim("run a", false, fast()).unwrap();
        a.check().unwrap();
        // Released at the end of the run: the next one takes it.
        a.release().unwrap();
        assert!(!dir.path().join(owner::OWNER).exists());
        store
            .claim("run b", true, fast())
            .unwrap()
            .release()
            .unwrap();
    }

    #[test]
    fn an_abandoned_claim_is_taken_and_a_holder_taken_over_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // Dropped without release (a failed run): the claim stays, unrenewed.
        drop(store.claim("run a", true, fast()).unwrap());
        assert!(dir.path().join(owner::OWNER).exists());
        let started = Instant::now();
        let b = store.claim("run b", true, fast()).unwrap();
        assert!(
            started.elapsed() >= fast().expire,
            "taken before it expired"
        );
        b.check().unwrap();
        // Another run writes its claim over b's: b's keeper notices at its next renewal.
        let other = Owner {
            pid: 1,
            ..Owner::me("run c")
        };
        store.rt.block_on(owner::write(&store.loc, &other)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let err = loop {
            if let Err(e) = b.check() {
                break e;
            }
            assert!(Instant::now() < deadline, "the takeover was not noticed");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            err.to_string()
                .contains("was taken over by another run, run c (pid 1 on"),
            "{err}"
        );
        // What b leaves is run c's claim, untouched.
        b.release().unwrap();
        let left = store.rt.block_on(owner::read(&store.loc)).unwrap().unwrap();
        assert_eq!(left.run, "run c");
    }
}
