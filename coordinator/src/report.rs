//! `kiln report RUN`: a self-contained HTML page drawn from a run's metrics log.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0}")]
    Other(String),
}

/// Reads the metrics log of `run` and writes the page to `output`; returns where it wrote.
pub async fn write(run: &str, output: &Path) -> Result<PathBuf, ReportError> {
    let _ = output;
    Err(ReportError::Other(format!("cannot report on {run} yet")))
}
