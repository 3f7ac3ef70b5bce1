//! The coordinator's view of its jobs as metrics and spans: job-level figures (from rank 0's
//! heartbeats and the job's state), served in the Prometheus text format on
//! `--metrics-listen` and exported over OTLP when that is on, and a `recovery` span from a
//! job's failure (or re-forming) to its next generation running.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use kiln_proto::control::WorkerState;
use kiln_telemetry::names::{self, Kind, Metric, JOB_ID, PHASE, PHASES, STATE};
use opentelemetry::KeyValue;

use crate::machine::{Machine, Phase};

/// One job, as the metrics show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFigures {
    pub id: String,
    pub phase: &'static str,
    pub generation: u64,
    /// Ranks of the current generation whose worker runs it and is heard from.
    pub workers: u64,
    pub recoveries: u64,
    pub stragglers: u64,
    pub committed_step: u64,
    /// Rank 0's last report, when there is one.
    pub progress: Option<kiln_proto::control::Progress>,
}

/// Everything the coordinator's metrics show at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub jobs: Vec<JobFigures>,
    pub workers_idle: u64,
    pub workers_busy: u64,
    pub jobs_by_phase: BTreeMap<&'static str, u64>,
}

const ALL_PHASES: [Phase; 8] = [
    Phase::Pending,
    Phase::Rendezvous,
    Phase::Running,
    Phase::Checkpointing,
    Phase::Recovering,
    Phase::Completed,
    Phase::Failed,
    Phase::Stopped,
];

pub fn snapshot(m: &Machine, now: f64) -> Snapshot {
    let alive = |id: &String, job: &str| {
        m.workers.get(id).is_some_and(|w| {
            !w.placeholder
                && w.report.job_id == job
                && w.report.state == WorkerState::Running
                && now - w.last_seen <= m.policy.heartbeat_timeout_s
        })
    };
    let jobs = m
        .jobs
        .values()
        .map(|j| JobFigures {
            id: j.id.clone(),
            phase: j.phase.name(),
            generation: j.generation,
            workers: j.ranks.iter().filter(|id| alive(id, &j.id)).count() as u64,
            recoveries: j.restarts.into(),
            stragglers: j
                .ranks
                .iter()
                .filter(|id| m.workers.get(*id).is_some_and(|w| w.straggler_reported))
                .count() as u64,
            committed_step: j.committed_step,
            progress: j
                .ranks
                .first()
                .and_then(|id| m.workers.get(id))
                .filter(|w| w.report.job_id == j.id)
                .and_then(|w| w.report.progress),
        })
        .collect();
    let (mut idle, mut busy) = (0, 0);
    for w in m.workers.values().filter(|w| !w.placeholder) {
        if w.report.state == WorkerState::Running {
            busy += 1;
        } else {
            idle += 1;
        }
    }
    let mut jobs_by_phase: BTreeMap<&'static str, u64> =
        ALL_PHASES.iter().map(|p| (p.name(), 0)).collect();
    for j in m.jobs.values() {
        *jobs_by_phase.entry(j.phase.name()).or_default() += 1;
    }
    Snapshot {
        jobs,
        workers_idle: idle,
        workers_busy: busy,
        jobs_by_phase,
    }
}

/// One series: its labels and value.
type Series = (Vec<(&'static str, String)>, f64);

/// Every metric of the snapshot with its series, in [`names::METRICS`] order.
fn series(s: &Snapshot) -> Vec<(Metric, Vec<Series>)> {
    let per_job = |f: &dyn Fn(&JobFigures) -> Option<f64>| -> Vec<Series> {
        s.jobs
            .iter()
            .filter_map(|j| f(j).map(|v| (vec![(JOB_ID, j.id.clone())], v)))
            .collect()
    };
    let progress = |f: fn(&kiln_proto::control::Progress) -> f64| {
        per_job(&move |j: &JobFigures| j.progress.as_ref().map(f))
    };
    let mut phase_series = Vec::new();
    for j in &s.jobs {
        if let Some(p) = &j.progress {
            for (name, v) in PHASES.iter().zip(p.phases) {
                phase_series.push((vec![(JOB_ID, j.id.clone()), (PHASE, name.to_string())], v));
            }
        }
    }
    vec![
        (names::JOB_THROUGHPUT, progress(|p| p.tokens_per_s)),
        (names::JOB_MFU, progress(|p| p.mfu)),
        (names::JOB_LOSS, progress(|p| p.loss)),
        (
            names::JOB_VALIDATION_LOSS,
            per_job(&|j: &JobFigures| {
                j.progress
                    .as_ref()
                    .filter(|p| p.val_step > 0)
                    .map(|p| p.val_loss)
            }),
        ),
        (names::JOB_STEP, progress(|p| p.step as f64)),
        (names::JOB_STEP_DURATION, progress(|p| p.step_s)),
        (names::JOB_PHASE_DURATION, phase_series),
        (
            names::JOB_WORKERS,
            per_job(&|j: &JobFigures| Some(j.workers as f64)),
        ),
        (
            names::JOB_RECOVERIES,
            per_job(&|j: &JobFigures| Some(j.recoveries as f64)),
        ),
        (
            names::JOB_STRAGGLERS,
            per_job(&|j: &JobFigures| Some(j.stragglers as f64)),
        ),
        (
            names::JOB_GENERATION,
            per_job(&|j: &JobFigures| Some(j.generation as f64)),
        ),
        (
            names::JOB_CHECKPOINT_STEP,
            per_job(&|j: &JobFigures| Some(j.committed_step as f64)),
        ),
        (
            names::COORDINATOR_WORKERS,
            vec![
                (vec![(STATE, "idle".into())], s.workers_idle as f64),
                (vec![(STATE, "busy".into())], s.workers_busy as f64),
            ],
        ),
        (
            names::COORDINATOR_JOBS,
            s.jobs_by_phase
                .iter()
                .map(|(phase, n)| (vec![(STATE, phase.to_string())], *n as f64))
                .collect(),
        ),
    ]
}

/// The snapshot in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus_text(s: &Snapshot) -> String {
    let mut out = String::new();
    for (metric, series) in series(s) {
        let name = metric.prometheus_name();
        let kind = match metric.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {name} {}", metric.description);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in series {
            let labels = labels
                .iter()
                .map(|(k, v)| format!("{}=\"{}\"", k.replace('.', "_"), escape_label(v)))
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(out, "{name}{{{labels}}} {}", number(value));
        }
    }
    out
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// Keeps the latest snapshot for the OTLP instruments and the open recovery spans.
pub struct Observer {
    latest: Arc<Mutex<Snapshot>>,
    recoveries: BTreeMap<String, tracing::Span>,
    /// Per job, its failure count and generation at the last update.
    seen: BTreeMap<String, (u32, u64)>,
    _instruments: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl Default for Observer {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer {
    /// Registers the job-level instruments (no-ops unless OTLP export is on).
    pub fn new() -> Observer {
        let latest = Arc::new(Mutex::new(Snapshot::default()));
        let meter = kiln_telemetry::meter();
        let mut instruments: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
        for metric in names::METRICS
            .iter()
            .filter(|m| m.source != names::Source::Rank)
        {
            let (latest, name) = (latest.clone(), metric.name);
            let observe = move |emit: &mut dyn FnMut(f64, &[KeyValue])| {
                let snapshot = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (m, series) in series(&snapshot) {
                    if m.name != name {
                        continue;
                    }
                    for (labels, value) in series {
                        let attributes: Vec<KeyValue> = labels
                            .into_iter()
                            .map(|(k, v)| KeyValue::new(k, v))
                            .collect();
                        emit(value, &attributes);
                    }
                }
            };
            match metric.kind {
                Kind::Counter => instruments.push(Box::new(
                    meter
                        .u64_observable_counter(metric.name)
                        .with_unit(metric.unit)
                        .with_description(metric.description)
                        .with_callback(move |o| observe(&mut |v, a| o.observe(v as u64, a)))
                        .build(),
                )),
                _ => instruments.push(Box::new(
                    meter
                        .f64_observable_gauge(metric.name)
                        .with_unit(metric.unit)
                        .with_description(metric.description)
                        .with_callback(move |o| observe(&mut |v, a| o.observe(v, a)))
                        .build(),
                )),
            }
        }
        Observer {
            latest,
            recoveries: BTreeMap::new(),
            seen: BTreeMap::new(),
            _instruments: instruments,
        }
    }

    /// Takes in the machine's state: the figures for the next export, and recovery spans
    /// opened when a job starts recovering and closed when its next generation runs (or the
    /// job ends).
    pub fn update(&mut self, m: &Machine, now: f64) {
        let snapshot = snapshot(m, now);
        for job in m.jobs.values() {
            // A failure since the last update, found by the job's failure count: a recovery
            // can go from the failure to the next generation running between two updates.
            let (restarts, generation) = self
                .seen
                .insert(job.id.clone(), (job.restarts, job.generation))
                .unwrap_or((job.restarts, job.generation));
            if job.restarts > restarts && !self.recoveries.contains_key(&job.id) {
                // The entry that entered the newest recovery (later ones in it say what it
                // did meanwhile).
                let entered = (0..job.log.len()).rev().find(|&i| {
                    job.log[i].phase == Phase::Recovering
                        && (i == 0 || job.log[i - 1].phase != Phase::Recovering)
                });
                let reason = entered.map_or(job.message.as_str(), |i| job.log[i].message.as_str());
                let span = tracing::info_span!(
                    parent: None,
                    "recovery",
                    kiln.job.id = %job.id,
                    kiln.generation = generation,
                    kiln.reason = %reason,
                    kiln.recoveries = job.restarts,
                    kiln.next_generation = tracing::field::Empty,
                    kiln.outcome = tracing::field::Empty,
                );
                self.recoveries.insert(job.id.clone(), span);
            }
            // A recovery lasts through the rendezvous of the next generation.
            let recovering = matches!(job.phase, Phase::Recovering | Phase::Rendezvous);
            if !recovering {
                if let Some(span) = self.recoveries.remove(&job.id) {
                    span.record("kiln.next_generation", job.generation);
                    span.record("kiln.outcome", job.phase.name());
                }
            }
        }
        self.recoveries.retain(|id, _| m.jobs.contains_key(id));
        self.seen.retain(|id, _| m.jobs.contains_key(id));
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }
}

/// Serves `GET /metrics` (the Prometheus text format) on `listener` until `stop` resolves;
/// `render` produces the page.
pub async fn serve_metrics<F, Fut>(
    listener: tokio::net::TcpListener,
    render: F,
    stop: impl std::future::Future<Output = ()>,
) where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::pin!(stop);
    loop {
        let (mut socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics endpoint: {e}");
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            // The request line and headers; a client that sends more than 16 KiB is refused.
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 << 10 {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    socket.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) if n > 0 => request.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let line = String::from_utf8_lossy(&request);
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            let (status, kind, body) = match (method, path) {
                ("GET", "/metrics") => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render().await,
                ),
                ("GET", "/") => (
                    "200 OK",
                    "text/plain; charset=utf-8",
                    "Kiln coordinator: metrics at /metrics\n".to_string(),
                ),
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "not found; metrics are at /metrics\n".to_string(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain; charset=utf-8",
                    "only GET\n".to_string(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_every_job_metric_with_labels() {
        let mut s = Snapshot {
            workers_idle: 1,
            workers_busy: 2,
            ..Snapshot::default()
        };
        s.jobs_by_phase.insert("running", 1);
        s.jobs.push(JobFigures {
            id: "demo-\"1\"".into(),
            phase: "running",
            generation: 2,
            workers: 2,
            recoveries: 1,
            stragglers: 0,
            committed_step: 50,
            progress: Some(kiln_proto::control::Progress {
                step: 60,
                steps: 200,
                loss: 5.5,
                tokens_per_s: 1840.0,
                phases: [0.0, 0.1, 0.2, 0.01, 0.05, 0.0],
                ..Default::default()
            }),
        });
        let text = prometheus_text(&s);
        assert!(text.contains("# TYPE kiln_job_throughput_per_second gauge\n"));
        assert!(
            text.contains("kiln_job_throughput_per_second{kiln_job_id=\"demo-\\\"1\\\"\"} 1840\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE kiln_job_recoveries_total counter\n"));
        assert!(text.contains("kiln_job_recoveries_total{kiln_job_id=\"demo-\\\"1\\\"\"} 1\n"));
        assert!(text.contains(
            "kiln_job_phase_duration_seconds{kiln_job_id=\"demo-\\\"1\\\"\",kiln_phase=\"backward\"} 0.2\n"
        ));
        assert!(text.contains("kiln_coordinator_workers{kiln_state=\"busy\"} 2\n"));
        // No validation yet: no validation series.
        assert!(!text.contains("kiln_job_validation_loss{"));
        // Every series line names a metric of the list.
        let known = names::prometheus_series();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split('{').next().unwrap();
            assert!(known.iter().any(|k| k == name), "{name}");
        }
    }
}
