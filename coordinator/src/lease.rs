//! One coordinator per state: a lease object (`state/lease.json`) that the coordinator
//! holding the state rewrites every [`LeaseTimes::renew`], so that a second coordinator
//! started on the same state is refused at start instead of taking the first one's jobs.
//!
//! A starting coordinator takes the state when there is no lease, when the lease's holder is
//! a process of this host that no longer exists (a coordinator killed and started again), or
//! when the lease is not rewritten for [`LeaseTimes::expire`] (its holder died elsewhere).
//! It compares what it reads, not clocks, so hosts need not agree on the time. If the lease
//! is rewritten while it watches, the holder is alive and the newcomer is refused, with the
//! holder named. The state's versioned writes (see [`crate::state`]) still fence two
//! coordinators that both think they hold it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_store::StoreLocation;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

const NAME: &str = "state/lease.json";

/// How often the holder rewrites its lease, and how long a newcomer waits for a rewrite
/// before it takes the state.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    pub renew: Duration,
    pub expire: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        LeaseTimes {
            renew: Duration::from_secs(2),
            expire: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "the state {url} is held by a running coordinator ({holder}, which renewed its lease while this one waited); stop it first, or give this coordinator another --state"
    )]
    Held { url: String, holder: String },
    #[error("state store {url}: the lease: {message}")]
    Io { url: String, message: String },
}

/// What the lease object says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    /// Distinguishes two holders with the same host and pid (a pid reused after a restart).
    started: String,
    /// Rewrites so far: a newcomer sees a live holder by this changing.
    renewals: u64,
}

impl Holder {
    fn named(&self) -> String {
        format!("pid {} on {}", self.pid, self.host)
    }

    fn same_process(&self, other: &Holder) -> bool {
        (&self.host, self.pid, &self.started) == (&other.host, other.pid, &other.started)
    }

    /// A process of this host that has exited.
    fn gone_from_this_host(&self) -> bool {
        self.host == hostname() && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The lease of this process on a state, kept by [`Lease::keep`].
pub struct Lease {
    loc: StoreLocation,
    me: Holder,
    times: LeaseTimes,
}

impl Lease {
    /// Takes the lease on the state at `loc`, waiting up to `times.expire` to tell a live
    /// holder from a dead one; refused while another coordinator holds it.
    pub async fn acquire(loc: StoreLocation, times: LeaseTimes) -> Result<Lease, LeaseError> {
        // Unique per lease taken, even two in one process in the same millisecond.
        static TAKEN: AtomicU64 = AtomicU64::new(0);
        let me = Holder {
            host: hostname(),
            pid: std::process::id(),
            started: format!("{:x}.{}", now_ms(), TAKEN.fetch_add(1, Ordering::Relaxed)),
            renewals: 0,
        };
        let lease = Lease { loc, me, times };
        if let Some(seen) = lease.read().await? {
            if !seen.gone_from_this_host() {
                lease.wait_out(seen).await?;
            }
        }
        lease.write(&lease.me).await?;
        Ok(lease)
    }

    /// Returns once `seen` has not been rewritten for `expire`; refused if it is.
    async fn wait_out(&self, seen: Holder) -> Result<(), LeaseError> {
        tracing::info!(
            "the state {} has a lease from {}: waiting up to {:?} to see whether it is alive",
            self.loc.url,
            seen.named(),
            self.times.expire
        );
        let deadline = tokio::time::Instant::now() + self.times.expire;
        let step = (self.times.renew / 4).max(Duration::from_millis(20));
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(step).await;
            match self.read().await? {
                None => return Ok(()),
                Some(now) if now != seen => {
                    return Err(LeaseError::Held {
                        url: self.loc.url.clone(),
                        holder: now.named(),
                    })
                }
                Some(_) => {}
            }
        }
        tracing::warn!(
            "the lease of {} on {} was not renewed for {:?}: taking the state over",
            seen.named(),
            self.loc.url,
            self.times.expire
        );
        Ok(())
    }

    /// Rewrites the lease every `renew` until `stop` changes (then gives it up, so that a
    /// successor need not wait for it to expire); calls `lost` and returns if another
    /// coordinator has taken the state meanwhile.
    pub async fn keep(mut self, lost: impl FnOnce(String), mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.times.renew) => {}
                _ = stop.changed() => {
                    if let Ok(Some(h)) = self.read().await {
                        if h.same_process(&self.me) {
                            let _ = self.loc.store.delete(&self.loc.child(NAME)).await;
                        }
                    }
                    return;
                }
            }
            let taken = match self.read().await {
                Ok(Some(h)) if !h.same_process(&self.me) => Some(h.named()),
                Ok(_) => None,
                // A store that cannot be read now is the state's writes' problem to report.
                Err(e) => {
                    tracing::warn!("{e}");
                    continue;
                }
            };
            if let Some(holder) = taken {
                let message = format!(
                    "the state {} was taken over by another coordinator ({holder}): stopping",
                    self.loc.url
                );
                tracing::error!("{message}");
                lost(message);
                return;
            }
            self.me.renewals += 1;
            if let Err(e) = self.write(&self.me).await {
                tracing::warn!("{e}");
            }
        }
    }

    fn io(&self, e: impl std::fmt::Display) -> LeaseError {
        LeaseError::Io {
            url: self.loc.url.clone(),
            message: e.to_string(),
        }
    }

    async fn read(&self) -> Result<Option<Holder>, LeaseError> {
        let bytes = self.loc.read(NAME).await.map_err(|e| self.io(e))?;
        // A lease that does not parse is no one's.
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    async fn write(&self, holder: &Holder) -> Result<(), LeaseError> {
        let bytes = serde_json::to_vec(holder).map_err(|e| self.io(e))?;
        self.loc
            .store
            .put(&self.loc.child(NAME), PutPayload::from(bytes))
            .await
            .map_err(|e| self.io(e))?;
        Ok(())
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> LeaseTimes {
        LeaseTimes {
            renew: Duration::from_millis(100),
            expire: Duration::from_millis(600),
        }
    }

    fn loc(dir: &std::path::Path) -> StoreLocation {
        std::fs::create_dir_all(dir.join("state")).unwrap();
        kiln_store::open(dir.to_str().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_live_holder_keeps_the_state_and_a_newcomer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lease::acquire(loc(dir.path()), fast()).await.unwrap();
        let (lost, lost_rx) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let keeper = tokio::spawn(first.keep(
            move |m| {
                lost.send_replace(Some(m));
            },
            stop_rx,
        ));
        let err = Lease::acquire(loc(dir.path()), fast())
            .await
            .err()
            .expect("a second coordinator is refused");
        let text = err.to_string();
        assert!(
            text.contains("is held by a running coordinator")
                && text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(lost_rx.borrow().is_none());
        // Stopped, it gives the lease up: the next coordinator takes the state at once.
        stop.send_replace(true);
        keeper.await.unwrap();
        let slow = LeaseTimes {
            renew: Duration::from_secs(60),
            expire: Duration::from_secs(600),
        };
        tokio::time::timeout(
            Duration::from_secs(60),
            Lease::acquire(loc(dir.path()), slow),
        )
        .await
        .expect("no wait for a lease given up")
        .unwrap();
    }

    #[tokio::test]
    async fn a_lease_nobody_renews_is_taken_over_and_its_holder_told() {
        let dir = tempfile::tempdir().unwrap();
        // Held by this process, but not kept: as if its holder hung or died on another host.
        let stale = Lease::acquire(loc(dir.path()), fast()).await.unwrap();
        let started = std::time::Instant::now();
        let newcomer = Lease::acquire(loc(dir.path()), fast()).await.unwrap();
        assert!(started.elapsed() >= fast().expire);
        // The old holder, waking up, finds the state taken and stops.
        let mut told = None;
        let (_stop, stop_rx) = watch::channel(false);
        stale.keep(|m| told = Some(m), stop_rx).await;
        let message = told.unwrap();
        assert!(
            message.contains("taken over by another coordinator"),
            "{message}"
        );
        drop(newcomer);
    }

    #[tokio::test]
    async fn a_lease_of_an_exited_process_of_this_host_is_taken_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let l = loc(dir.path());
        // A process that has exited: its pid is gone from /proc.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Holder {
            host: hostname(),
            pid,
            started: "1".into(),
            renewals: 7,
        };
        let lease = Lease {
            loc: l.clone(),
            me: dead.clone(),
            times: fast(),
        };
        lease.write(&dead).await.unwrap();
        let slow = LeaseTimes {
            renew: Duration::from_secs(60),
            expire: Duration::from_secs(600),
        };
        tokio::time::timeout(Duration::from_secs(60), Lease::acquire(l, slow))
            .await
            .expect("no wait for the lease of an exited process")
            .unwrap();
    }
}
