//! One writer per place: `owner.json` at the top of a checkpoint directory names the run that
//! writes there, and the process of that run (its rank 0) rewrites it every few seconds while
//! it trains. Every rank reads it before it writes anything, and a coordinator reads it at
//! submit, so that two runs never mix their checkpoints and logs in one directory.
//!
//! A run is the same `run` string for all its ranks and generations: a coordinator's job id
//! with its own tag, or what a hand-started `kiln train` derives from its rank 0. A claim
//! whose holder is a process of this host that has exited, or that nobody rewrites for the
//! expiry (its holder died elsewhere, or was killed), is free; comparing what is read, not
//! clocks, decides that, so hosts need not agree on the time.

use std::time::Duration;

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::StoreLocation;

/// The object, at the top of the directory it guards.
pub const OWNER: &str = "owner.json";

/// How often the holder rewrites its claim, and how long a newcomer watches an unchanged
/// claim before it counts as abandoned.
#[derive(Debug, Clone, Copy)]
pub struct OwnerTimes {
    pub renew: Duration,
    pub expire: Duration,
}

impl Default for OwnerTimes {
    fn default() -> Self {
        OwnerTimes {
            renew: Duration::from_secs(2),
            expire: Duration::from_secs(10),
        }
    }
}

impl OwnerTimes {
    /// The defaults, or `KILN_OWNER_RENEW_S` and `KILN_OWNER_EXPIRE_S` where set.
    pub fn from_env() -> Self {
        let d = OwnerTimes::default();
        let secs = |name: &str, default: Duration| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(default, Duration::from_secs_f64)
        };
        OwnerTimes {
            renew: secs("KILN_OWNER_RENEW_S", d.renew),
            expire: secs("KILN_OWNER_EXPIRE_S", d.expire),
        }
    }
}

/// What `owner.json` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Owner {
    /// The run that writes here; equal for all its ranks and generations.
    pub run: String,
    /// The process that keeps the claim.
    pub host: String,
    pub pid: u32,
    /// Distinguishes two processes with one host and pid (a pid reused).
    pub started: String,
    /// Rewrites so far: a reader sees a live holder by this changing.
    pub renewals: u64,
    /// When it was last rewritten (seconds since 1970), for messages and for a reader that
    /// cannot wait (a coordinator at submit).
    pub unix_s: f64,
}

impl Owner {
    /// A claim for `run` by this process.
    pub fn me(run: &str) -> Owner {
        Owner {
            run: run.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            started: format!("{:x}", (now() * 1e6) as u64),
            renewals: 0,
            unix_s: now(),
        }
    }

    /// "pid P on HOST".
    pub fn process(&self) -> String {
        format!("pid {} on {}", self.pid, self.host)
    }

    /// The run, and the process keeping its claim unless the run's name says it already.
    pub fn describe(&self) -> String {
        let process = self.process();
        if self.run.contains(&process) {
            self.run.clone()
        } else {
            format!("{} ({process})", self.run)
        }
    }

    pub fn same_process(&self, other: &Owner) -> bool {
        (&self.host, self.pid, &self.started) == (&other.host, other.pid, &other.started)
    }

    /// Held by a process of this host that has exited.
    pub fn gone_from_this_host(&self) -> bool {
        self.host == hostname() && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The claim on `loc`, if any. One that does not parse is no one's.
pub async fn read(loc: &StoreLocation) -> Result<Option<Owner>, object_store::Error> {
    Ok(loc
        .read(OWNER)
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Writes (replaces) the claim.
pub async fn write(loc: &StoreLocation, owner: &Owner) -> Result<(), object_store::Error> {
    let bytes = serde_json::to_vec(owner).expect("an owner serializes");
    loc.store
        .put(&loc.child(OWNER), PutPayload::from(bytes))
        .await
        .map(|_| ())
}

/// Writes the claim only where there is none; `false` if one appeared first. A store
/// without conditional writes gets a plain write.
pub async fn create(loc: &StoreLocation, owner: &Owner) -> Result<bool, object_store::Error> {
    let bytes = serde_json::to_vec(owner).expect("an owner serializes");
    let options = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    let path = loc.child(OWNER);
    match loc
        .store
        .put_opts(&path, PutPayload::from(bytes), options)
        .await
    {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(object_store::Error::NotImplemented { .. }) => write(loc, owner).await.map(|()| true),
        Err(e) => Err(e),
    }
}

/// Removes the claim if `me` still holds it.
pub async fn release(loc: &StoreLocation, me: &Owner) -> Result<(), object_store::Error> {
    if read(loc).await?.is_some_and(|o| o.same_process(me)) {
        match loc.store.delete(&loc.child(OWNER)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What a rank that wants to write at `loc` for `run` found there.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// No claim, this run's own, or one abandoned: go ahead.
    Free,
    /// Another run's, rewritten while this one watched.
    Held(Owner),
}

/// Looks at the claim on `loc` for `run`: free unless another run's holder is seen alive
/// (it rewrote its claim within `times.expire`; this waits up to that long).
pub async fn look(
    loc: &StoreLocation,
    run: &str,
    times: OwnerTimes,
) -> Result<Found, object_store::Error> {
    let Some(seen) = read(loc).await? else {
        return Ok(Found::Free);
    };
    if seen.run == run || seen.gone_from_this_host() {
        return Ok(Found::Free);
    }
    let deadline = tokio::time::Instant::now() + times.expire;
    let step = (times.renew / 4).max(Duration::from_millis(20));
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(step).await;
        match read(loc).await? {
            None => return Ok(Found::Free),
            Some(now) if now.run == run => return Ok(Found::Free),
            Some(now) if now != seen => return Ok(Found::Held(now)),
            Some(_) => {}
        }
    }
    Ok(Found::Free)
}
