//! A submitted job checked as `kiln train` checks it before its first step
//! ([`kiln_proto::preflight`]), so that a job that cannot run is refused at submit with the
//! message `kiln train` gives, instead of failing on every worker it is given.

use kiln_proto::job::JobConfig;
use kiln_proto::preflight;

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
