//! A submitted job checked as `kiln train` checks it before its first step
//! ([`kiln_proto::preflight`]), so that a job that cannot run is refused at submit with the
//! message `kiln train` gives, instead of failing on every worker it is given.

use kiln_proto::job::JobConfig;
use kiln_proto::preflight;
use kiln_store::owner::{self, Owner, OwnerTimes};

/// Whether the coordinator also reads each data source's manifest at submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataCheck {
    /// Read them with this process's credentials (the default): a missing dataset, an
    /// unreachable store, mixed tokenizers and a vocabulary too small are refused at submit.
    Read,
    /// Check the job file alone: for a coordinator that cannot see the workers' data.
    Skip,
}

/// `Err` holds the message `kiln train` would print for the same job.
pub async fn check(job: &JobConfig, data: DataCheck) -> Result<(), String> {
    let config = preflight::model(job).map_err(|e| e.to_string())?;
    if data == DataCheck::Skip {
        return Ok(());
    }
    let mut manifests = Vec::new();
    for source in job.data.sources() {
        let location = kiln_store::open(&source.path).map_err(|e| e.to_string())?;
        manifests.push(
            location
                .dataset_manifest()
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    preflight::tokenizers(job, &manifests).map_err(|e| e.to_string())?;
    if let (Some(config), Some(first)) = (config, manifests.first()) {
        preflight::fits(job, &config, first).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The claim on the job's checkpoint directory (`owner.json`, see [`kiln_store::owner`]) if
/// it looks alive: rewritten within `times.expire` by this host's clock (a submit cannot wait
/// to watch it, as a rank does), and not held by an exited process of this host.
pub async fn live_claim(job: &JobConfig, times: OwnerTimes) -> Result<Option<Owner>, String> {
    let dir = job.checkpoint_dir();
    let loc = kiln_store::open(&dir).map_err(|e| format!("checkpoint.dir: {e}"))?;
    let claim = owner::read(&loc)
        .await
        .map_err(|e| format!("checkpoint.dir: {}: {e}", loc.display(owner::OWNER)))?;
    Ok(claim.filter(|o| {
        owner::now() - o.unix_s < times.expire.as_secs_f64() && !o.gone_from_this_host()
    }))
}

/// The refusal of a job whose checkpoint directory another run holds.
pub fn claimed(job: &JobConfig, o: &Owner) -> String {
    format!(
        "{} is being written by another run, {}, which renewed its claim {:.0} s ago: two runs \
         would mix their checkpoints and logs there; stop that run, or give this job another \
         checkpoint.dir (and output.dir)",
        job.checkpoint_dir(),
        o.describe(),
        (owner::now() - o.unix_s).max(0.0)
    )
}
