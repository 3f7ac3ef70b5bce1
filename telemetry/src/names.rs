//! Every metric Kiln exports: its OpenTelemetry name, unit and kind, and the name it has in
//! Prometheus. The training ranks export the `kiln.train.*` and `kiln.checkpoint.*` metrics
//! over OTLP; the coordinator exports the `kiln.job.*` and `kiln.coordinator.*` metrics over
//! OTLP and on its Prometheus endpoint. Dashboards (`deploy/grafana/`) and the README's table
//! are checked against this list.

/// How a metric aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The last value.
    Gauge,
    /// A monotonic sum.
    Counter,
    /// A distribution (count, sum, buckets).
    Histogram,
}

/// Who exports a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Each training rank (resource attributes `kiln.job.id`, `kiln.rank`, `host.name`,
    /// `kiln.device`).
    Rank,
    /// The coordinator, one series per job (attribute `kiln.job.id`).
    Job,
    /// The coordinator, about itself.
    Coordinator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    /// UCUM unit, as OpenTelemetry writes it (`s`, `By`, `1`, `{token}/s`).
    pub unit: &'static str,
    pub kind: Kind,
    pub source: Source,
    /// The data point attributes that split the series.
    pub attributes: &'static [&'static str],
    pub description: &'static str,
}

impl Metric {
    /// The name the OpenTelemetry Collector's Prometheus exporter (and Kiln's own endpoint)
    /// gives it: dots become underscores, the unit becomes a suffix (`s` -> `_seconds`, `By`
    /// -> `_bytes`, `/s` -> `_per_second`, `1` on a gauge -> `_ratio`; annotations such as
    /// `{token}` are dropped), and counters end in `_total`.
    pub fn prometheus_name(&self) -> String {
        let mut name = self.name.replace(['.', '-'], "_");
        let unit = strip_annotations(self.unit);
        let suffix = match (unit.as_str(), self.kind) {
            ("", _) => String::new(),
            ("1", Kind::Gauge) => "ratio".to_string(),
            ("1", _) => String::new(),
            (u, _) => match u.split_once('/') {
                Some((num, den)) => {
                    let num = unit_word(num);
                    let den = per_unit_word(den);
                    match (num.is_empty(), den.is_empty()) {
                        (true, false) => format!("per_{den}"),
                        (false, false) => format!("{num}_per_{den}"),
                        _ => num,
                    }
                }
                None => unit_word(u),
            },
        };
        if !suffix.is_empty() && !name.ends_with(&format!("_{suffix}")) {
            name = format!("{name}_{suffix}");
        }
        if self.kind == Kind::Counter {
            name.push_str("_total");
        }
        name
    }
}

fn strip_annotations(unit: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fn unit_word(unit: &str) -> String {
    match unit {
        "s" => "seconds",
        "ms" => "milliseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "m" => "minutes",
        "h" => "hours",
        "d" => "days",
        other => other,
    }
    .to_string()
}

fn per_unit_word(unit: &str) -> String {
    match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        other => other,
    }
    .to_string()
}

const fn m(
    name: &'static str,
    unit: &'static str,
    kind: Kind,
    source: Source,
    attributes: &'static [&'static str],
    description: &'static str,
) -> Metric {
    Metric {
        name,
        unit,
        kind,
        source,
        attributes,
        description,
    }
}

use Kind::{Counter, Gauge, Histogram};
use Source::{Coordinator, Job, Rank};

/// Attribute naming a step's phase on [`TRAIN_PHASE_DURATION`] and [`JOB_PHASE_DURATION`]:
/// `data_wait`, `forward`, `backward`, `collective`, `optimizer`, `checkpoint`.
pub const PHASE: &str = "kiln.phase";
/// The phases a step's time is split into, in order (the names of
/// [`kiln_proto::run::Phase::ALL`], as in logs and heartbeats).
pub use kiln_proto::run::PHASE_NAMES as PHASES;
/// Attribute naming the job on the coordinator's metrics (and a resource attribute of ranks).
pub const JOB_ID: &str = "kiln.job.id";
/// Resource attributes of a training rank.
pub const RANK: &str = "kiln.rank";
pub const GENERATION: &str = "kiln.generation";
pub const DEVICE: &str = "kiln.device";
pub const HOST: &str = "host.name";
/// Attribute of [`COORDINATOR_WORKERS`] (`idle`, `busy`) and [`COORDINATOR_JOBS`] (a phase).
pub const STATE: &str = "kiln.state";

pub const TRAIN_THROUGHPUT: Metric = m(
    "kiln.train.throughput",
    "{token}/s",
    Gauge,
    Rank,
    &[],
    "Tokens this rank's data-parallel replica trains per second (the job's rate / dp).",
);
pub const TRAIN_MFU: Metric = m(
    "kiln.train.mfu",
    "1",
    Gauge,
    Rank,
    &[],
    "Model FLOPs utilization: model FLOPs per second over the device's peak.",
);
pub const TRAIN_LOSS: Metric = m(
    "kiln.train.loss",
    "",
    Gauge,
    Rank,
    &[],
    "Training loss (mean cross-entropy per token, in nats) of the last step.",
);
pub const TRAIN_VALIDATION_LOSS: Metric = m(
    "kiln.train.validation.loss",
    "",
    Gauge,
    Rank,
    &[],
    "Validation loss of the last evaluation.",
);
pub const TRAIN_GRAD_NORM: Metric = m(
    "kiln.train.grad_norm",
    "",
    Gauge,
    Rank,
    &[],
    "Global gradient norm before clipping.",
);
pub const TRAIN_LEARNING_RATE: Metric = m(
    "kiln.train.learning_rate",
    "",
    Gauge,
    Rank,
    &[],
    "Learning rate of the last step.",
);
pub const TRAIN_STEP: Metric = m(
    "kiln.train.step",
    "{step}",
    Gauge,
    Rank,
    &[],
    "Optimizer steps done.",
);
pub const TRAIN_STEPS: Metric = m(
    "kiln.train.steps",
    "{step}",
    Counter,
    Rank,
    &[],
    "Optimizer steps this process ran.",
);
pub const TRAIN_TOKENS: Metric = m(
    "kiln.train.tokens",
    "{token}",
    Counter,
    Rank,
    &[],
    "Tokens this rank's data-parallel replica trained on.",
);
pub const TRAIN_STEP_DURATION: Metric = m(
    "kiln.train.step.duration",
    "s",
    Gauge,
    Rank,
    &[],
    "Mean wall time of a step over the last log window (checkpoint snapshots excluded).",
);
pub const TRAIN_PHASE_DURATION: Metric = m(
    "kiln.train.phase.duration",
    "s",
    Counter,
    Rank,
    &[PHASE],
    "Time spent in each phase of the steps; rate(phase) / rate(steps) is seconds per step.",
);
pub const CHECKPOINT_SAVE_DURATION: Metric = m(
    "kiln.checkpoint.save.duration",
    "s",
    Histogram,
    Rank,
    &[],
    "Time to write this rank's checkpoint object (and, on rank 0, to commit the manifest).",
);
pub const CHECKPOINT_PAUSE_DURATION: Metric = m(
    "kiln.checkpoint.pause.duration",
    "s",
    Histogram,
    Rank,
    &[],
    "Time training was held for a checkpoint.",
);
pub const CHECKPOINT_SIZE: Metric = m(
    "kiln.checkpoint.size",
    "By",
    Counter,
    Rank,
    &[],
    "Bytes of checkpoint objects this rank wrote.",
);
pub const CHECKPOINT_SAVES: Metric = m(
    "kiln.checkpoint.saves",
    "{checkpoint}",
    Counter,
    Rank,
    &[],
    "Checkpoints this rank saved.",
);

pub const JOB_THROUGHPUT: Metric = m(
    "kiln.job.throughput",
    "{token}/s",
    Gauge,
    Job,
    &[JOB_ID],
    "Tokens the whole job trains per second.",
);
pub const JOB_MFU: Metric = m(
    "kiln.job.mfu",
    "1",
    Gauge,
    Job,
    &[JOB_ID],
    "Model FLOPs utilization over all the job's devices.",
);
pub const JOB_LOSS: Metric = m(
    "kiln.job.loss",
    "",
    Gauge,
    Job,
    &[JOB_ID],
    "Training loss of the job's last reported step.",
);
pub const JOB_VALIDATION_LOSS: Metric = m(
    "kiln.job.validation.loss",
    "",
    Gauge,
    Job,
    &[JOB_ID],
    "Validation loss of the job's last evaluation.",
);
pub const JOB_STEP: Metric = m(
    "kiln.job.step",
    "{step}",
    Gauge,
    Job,
    &[JOB_ID],
    "Steps the job has done.",
);
pub const JOB_STEP_DURATION: Metric = m(
    "kiln.job.step.duration",
    "s",
    Gauge,
    Job,
    &[JOB_ID],
    "Mean step time rank 0 reported last.",
);
pub const JOB_PHASE_DURATION: Metric = m(
    "kiln.job.phase.duration",
    "s",
    Gauge,
    Job,
    &[JOB_ID, PHASE],
    "Seconds per step in each phase, as rank 0 reported last.",
);
pub const JOB_WORKERS: Metric = m(
    "kiln.job.workers",
    "{worker}",
    Gauge,
    Job,
    &[JOB_ID],
    "Workers running the job's current generation and alive.",
);
pub const JOB_RECOVERIES: Metric = m(
    "kiln.job.recoveries",
    "{recovery}",
    Counter,
    Job,
    &[JOB_ID],
    "Times the job was brought back from a checkpoint after a failure.",
);
pub const JOB_STRAGGLERS: Metric = m(
    "kiln.job.stragglers",
    "{worker}",
    Gauge,
    Job,
    &[JOB_ID],
    "Ranks whose compute time per step is over the straggler threshold.",
);
pub const JOB_GENERATION: Metric = m(
    "kiln.job.generation",
    "",
    Gauge,
    Job,
    &[JOB_ID],
    "The job's generation (a new one per recovery or change of worker count).",
);
pub const JOB_CHECKPOINT_STEP: Metric = m(
    "kiln.job.checkpoint.step",
    "{step}",
    Gauge,
    Job,
    &[JOB_ID],
    "Step of the job's last committed checkpoint.",
);
pub const COORDINATOR_WORKERS: Metric = m(
    "kiln.coordinator.workers",
    "{worker}",
    Gauge,
    Coordinator,
    &[STATE],
    "Registered workers, idle or busy.",
);
pub const COORDINATOR_JOBS: Metric = m(
    "kiln.coordinator.jobs",
    "{job}",
    Gauge,
    Coordinator,
    &[STATE],
    "Jobs in each phase.",
);

/// Every metric, in the README's order.
pub const METRICS: &[Metric] = &[
    TRAIN_THROUGHPUT,
    TRAIN_MFU,
    TRAIN_LOSS,
    TRAIN_VALIDATION_LOSS,
    TRAIN_GRAD_NORM,
    TRAIN_LEARNING_RATE,
    TRAIN_STEP,
    TRAIN_STEPS,
    TRAIN_TOKENS,
    TRAIN_STEP_DURATION,
    TRAIN_PHASE_DURATION,
    CHECKPOINT_SAVE_DURATION,
    CHECKPOINT_PAUSE_DURATION,
    CHECKPOINT_SIZE,
    CHECKPOINT_SAVES,
    JOB_THROUGHPUT,
    JOB_MFU,
    JOB_LOSS,
    JOB_VALIDATION_LOSS,
    JOB_STEP,
    JOB_STEP_DURATION,
    JOB_PHASE_DURATION,
    JOB_WORKERS,
    JOB_RECOVERIES,
    JOB_STRAGGLERS,
    JOB_GENERATION,
    JOB_CHECKPOINT_STEP,
    COORDINATOR_WORKERS,
    COORDINATOR_JOBS,
];

/// Every name a Prometheus query may use for Kiln's metrics: each metric's Prometheus name,
/// and for histograms their `_bucket`, `_sum` and `_count` series.
pub fn prometheus_series() -> Vec<String> {
    let mut out = Vec::new();
    for metric in METRICS {
        let name = metric.prometheus_name();
        if metric.kind == Kind::Histogram {
            for part in ["bucket", "sum", "count"] {
                out.push(format!("{name}_{part}"));
            }
        }
        out.push(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_follow_the_collector() {
        let name = |metric: &Metric| metric.prometheus_name();
        assert_eq!(name(&TRAIN_THROUGHPUT), "kiln_train_throughput_per_second");
        assert_eq!(name(&TRAIN_MFU), "kiln_train_mfu_ratio");
        assert_eq!(name(&TRAIN_LOSS), "kiln_train_loss");
        assert_eq!(name(&TRAIN_STEPS), "kiln_train_steps_total");
        assert_eq!(
            name(&TRAIN_PHASE_DURATION),
            "kiln_train_phase_duration_seconds_total"
        );
        assert_eq!(name(&CHECKPOINT_SIZE), "kiln_checkpoint_size_bytes_total");
        assert_eq!(
            name(&CHECKPOINT_SAVE_DURATION),
            "kiln_checkpoint_save_duration_seconds"
        );
        assert_eq!(name(&JOB_RECOVERIES), "kiln_job_recoveries_total");
        assert_eq!(name(&JOB_WORKERS), "kiln_job_workers");
    }

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for metric in METRICS {
            assert!(seen.insert(metric.name), "{} twice", metric.name);
            assert!(metric.name.starts_with("kiln."), "{}", metric.name);
            assert!(
                metric
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_'),
                "{}",
                metric.name
            );
        }
        let series = prometheus_series();
        assert!(series.contains(&"kiln_checkpoint_save_duration_seconds_sum".to_string()));
    }
}
