//! `kiln report RUN`: a self-contained HTML page drawn from a run's metrics log.
//!
//! - [`log`]: `metrics.jsonl` read into the last value of each step (pure).
//! - [`plot`]: SVG charts as text: nice ticks, lines, stacked areas (pure).
//! - [`page`]: the page: a summary, the loss, throughput and step-time plots, the
//!   checkpoints (pure). Nothing on it is loaded from elsewhere: style and plots are inline.
//!
//! This module finds the log: `RUN` is a directory or store URL holding `metrics.jsonl`
//! (the job's `output.dir`, or its checkpoint directory, where rank 0 uploads the log), the
//! log itself, or the job file (then `output.dir` first, the checkpoint directory second).

pub mod log;
pub mod page;
pub mod plot;

use std::path::{Path, PathBuf};

use kiln_proto::job::{JobConfig, JobError};
use kiln_store::{self as store, StoreError};
use object_store::ObjectStoreExt;

pub use log::{ParseError, RunLog};
pub use page::Meta;

/// The log's file name in a run's directories.
pub const METRICS: &str = "metrics.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "no metrics log at {at}: expected {METRICS} there (a run's output directory, or its checkpoint directory); kiln report also takes the log file itself or the run's job file"
    )]
    NoLog { at: String },
    #[error(
        "no metrics log for job file {job}: expected {METRICS} in output.dir ({output}) or in the checkpoint directory ({checkpoints})"
    )]
    NoJobLog {
        job: PathBuf,
        output: String,
        checkpoints: String,
    },
    #[error("the metrics log {at} is empty: the run has not logged anything yet")]
    Empty { at: String },
    #[error("malformed metrics log {at}, line {line}: {message}")]
    Malformed {
        at: String,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read {at}: {message}")]
    Read { at: String, message: String },
    #[error("cannot write the report to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A metrics log found, as bytes.
#[derive(Debug)]
pub struct Found {
    /// Where it was read, for messages and the page.
    pub at: String,
    pub bytes: Vec<u8>,
    /// The job's name, when `RUN` was its job file.
    pub job: Option<String>,
}

/// Reads the metrics log of `run` and writes the page to `output` (creating its directory);
/// returns where it wrote.
pub async fn write(run: &str, output: &Path) -> Result<PathBuf, ReportError> {
    let found = find(run).await?;
    let log = read(&found)?;
    let html = page::render(
        &log,
        &Meta {
            job: found
                .job
                .or_else(|| log.start.as_ref().and_then(|s| s.job.clone())),
            source: found.at,
        },
    );
    let write_err = |source| ReportError::Write {
        path: output.to_owned(),
        source,
    };
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await.map_err(write_err)?;
    }
    tokio::fs::write(output, html).await.map_err(write_err)?;
    Ok(output.to_owned())
}

/// Parses a found log, naming it in errors.
pub fn read(found: &Found) -> Result<RunLog, ReportError> {
    log::parse(&String::from_utf8_lossy(&found.bytes)).map_err(|e| match e {
        ParseError::Empty => ReportError::Empty {
            at: found.at.clone(),
        },
        ParseError::Line { line, message } => ReportError::Malformed {
            at: found.at.clone(),
            line,
            message,
        },
    })
}

/// Finds and reads the metrics log `run` names.
pub async fn find(run: &str) -> Result<Found, ReportError> {
    let local = match run.split_once("://") {
        None => Some(PathBuf::from(run)),
        Some(("file", path)) => Some(PathBuf::from(path)),
        Some(_) => None,
    };
    if let Some(path) = &local {
        if path.extension().is_some_and(|e| e == "toml") {
            return from_job(path).await;
        }
        if path.is_file() {
            let bytes = tokio::fs::read(path).await.map_err(|e| ReportError::Read {
                at: run.to_owned(),
                message: e.to_string(),
            })?;
            return Ok(Found {
                at: run.to_owned(),
                bytes,
                job: None,
            });
        }
    }
    let trimmed = run.trim_end_matches('/');
    let (dir, name) = match trimmed.rsplit_once('/') {
        Some((dir, name)) if name.ends_with(".jsonl") && !dir.ends_with(":/") => (dir, name),
        None if trimmed.ends_with(".jsonl") => (".", trimmed),
        _ => (run, METRICS),
    };
    match fetch(dir, name).await? {
        Some((at, bytes)) => Ok(Found {
            at,
            bytes,
            job: None,
        }),
        None => Err(ReportError::NoLog { at: run.to_owned() }),
    }
}

/// The log of the job a job file describes: in `output.dir`, else in the checkpoint
/// directory.
async fn from_job(path: &Path) -> Result<Found, ReportError> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| ReportError::Read {
                at: path.display().to_string(),
                message: e.to_string(),
            })?
            .join(path)
    };
    let job = JobConfig::load(&abs)?;
    let output = job.output.dir.to_string_lossy().into_owned();
    let checkpoints = job.checkpoint_dir();
    for dir in [&output, &checkpoints] {
        if let Some((at, bytes)) = fetch(dir, METRICS).await? {
            return Ok(Found {
                at,
                bytes,
                job: Some(job.name.clone()),
            });
        }
    }
    Err(ReportError::NoJobLog {
        job: path.to_owned(),
        output,
        checkpoints,
    })
}

/// The object `name` under the store URL or directory `dir`, or `None` where it is absent.
async fn fetch(dir: &str, name: &str) -> Result<Option<(String, Vec<u8>)>, ReportError> {
    let loc = store::open(dir)?;
    let at = loc.display(name);
    if loc
        .local_dir
        .as_ref()
        .is_some_and(|d| !d.join(name).is_file())
    {
        // Also a directory that is missing, or a file where one was expected.
        return Ok(None);
    }
    let read_err = |e: object_store::Error| ReportError::Read {
        at: at.clone(),
        message: e.to_string(),
    };
    let got = match loc.store.get(&loc.child(name)).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let bytes = got.bytes().await.map_err(read_err)?;
    Ok(Some((at, bytes.to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::PutPayload;

    const LOG: &str = concat!(
        r#"{"type":"start","params":100,"world":1,"dp":1,"tp":1,"zero1":false,"device":"Cpu","bf16":false,"flops_per_token":1.0,"peak_flops":1.0,"train_sequences":1,"validation_sequences":1}"#,
        "\n",
        r#"{"type":"step","step":1,"steps":2,"loss":9.0,"tokens_per_s":10.0,"mfu":0.1,"step_s":0.5,"data_wait":0.0,"collective_wait":0.0}"#,
        "\n",
        r#"{"type":"step","step":2,"steps":2,"loss":8.0,"tokens_per_s":10.0,"mfu":0.1,"step_s":0.5,"data_wait":0.0,"collective_wait":0.0}"#,
        "\n",
    );

    fn job_file(dir: &Path, name: &str, checkpoints: &str) -> PathBuf {
        let path = dir.join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\n[model]\npreset = \"tiny\"\n[data]\npath = \"data\"\n[train]\nseq_len = 64\nbatch_size = 8\nsteps = 2\n[checkpoint]\nevery = 1\ndir = \"{checkpoints}\"\n[output]\ndir = \"out\"\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    #[tokio::test]
    async fn finds_the_log_in_a_directory_a_file_a_store_and_a_job() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(METRICS), LOG).unwrap();
        let found = find(dir.to_str().unwrap()).await.unwrap();
        assert_eq!(found.at, format!("{}/metrics.jsonl", dir.display()));
        assert_eq!(found.bytes, LOG.as_bytes());
        let file = dir.join(METRICS);
        assert_eq!(
            find(file.to_str().unwrap()).await.unwrap().bytes,
            LOG.as_bytes()
        );
        let url = format!("file://{}/", dir.display());
        assert_eq!(find(&url).await.unwrap().bytes, LOG.as_bytes());

        // A store URL: the checkpoint directory, to which rank 0 uploads the log.
        let loc = store::open("memory://report-test/run/checkpoints").unwrap();
        loc.store
            .put(
                &loc.child(METRICS),
                PutPayload::from(LOG.as_bytes().to_vec()),
            )
            .await
            .unwrap();
        let found = find("memory://report-test/run/checkpoints").await.unwrap();
        assert_eq!(
            found.at,
            "memory://report-test/run/checkpoints/metrics.jsonl"
        );
        assert_eq!(found.bytes, LOG.as_bytes());
        let found = find("memory://report-test/run/checkpoints/metrics.jsonl")
            .await
            .unwrap();
        assert_eq!(found.bytes, LOG.as_bytes());

        // A job file: output.dir first...
        let job = job_file(tmp.path(), "jobby", "memory://report-test/run/checkpoints");
        let found = find(job.to_str().unwrap()).await.unwrap();
        assert_eq!(found.job.as_deref(), Some("jobby"));
        assert_eq!(found.at, format!("{}/metrics.jsonl", dir.display()));
        // ...then the checkpoint directory.
        std::fs::remove_file(dir.join(METRICS)).unwrap();
        let found = find(job.to_str().unwrap()).await.unwrap();
        assert_eq!(
            found.at,
            "memory://report-test/run/checkpoints/metrics.jsonl"
        );
        // Neither.
        let job = job_file(tmp.path(), "nolog", "memory://report-test/elsewhere");
        let err = find(job.to_str().unwrap()).await.unwrap_err().to_string();
        assert!(
            err.starts_with("no metrics log for job file")
                && err.contains("memory://report-test/elsewhere"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let at = tmp.path().to_str().unwrap().to_owned();
        let out = tmp.path().join("r/report.html");
        let err = write(&at, &out).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!("no metrics log at {at}: expected metrics.jsonl there (a run's output directory, or its checkpoint directory); kiln report also takes the log file itself or the run's job file")
        );
        let missing = format!("{at}/nothing/here.jsonl");
        let err = write(&missing, &out).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("no metrics log at {missing}:")),
            "{err}"
        );
        let err = write("memory://report-test/void", &out)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("no metrics log at memory://report-test/void:"),
            "{err}"
        );

        std::fs::write(tmp.path().join(METRICS), "").unwrap();
        let err = write(&at, &out).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "the metrics log {at}/metrics.jsonl is empty: the run has not logged anything yet"
            )
        );
        std::fs::write(
            tmp.path().join(METRICS),
            format!("{LOG}{{\"type\":\"step\"}}\n{LOG}"),
        )
        .unwrap();
        let err = write(&at, &out).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("malformed metrics log {at}/metrics.jsonl, line 4: a \"step\" event: missing field `step`")),
            "{err}"
        );
        // A last line cut short is no error.
        std::fs::write(
            tmp.path().join(METRICS),
            format!("{LOG}{{\"type\":\"step\",\"st"),
        )
        .unwrap();
        assert_eq!(write(&at, &out).await.unwrap(), out);
        let html = std::fs::read_to_string(&out).unwrap();
        assert_eq!(html.matches("<svg").count(), 3);
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
}
