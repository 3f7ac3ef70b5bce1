//! The metrics log (`metrics.jsonl`) as plain data: one JSON object per line, tagged by
//! `"type"`, reduced to the last value of each step.
//!
//! Tolerant of what real logs contain: a last line cut short by a killed process (skipped),
//! steps repeated by a recovery (the last one counts), event types it does not know
//! (ignored), fields it does not know (ignored), logs of older versions without `phases`,
//! `window_steps` or `time`, and `null` where a value was not finite (a diverged loss).
//!
//! The lines are [`kiln_proto::run::Event`]s; the views here keep every value optional (a
//! report tells a missing or `null` value apart from a zero) and keep phases by name (a log
//! may name phases this version does not know), so they are read into these views rather than
//! into the events themselves. A test below holds the two together field by field.

use std::collections::BTreeMap;

use kiln_proto::json::kind as json_kind;
use kiln_proto::run::Phase;
use serde::Deserialize;

/// The run's configuration, from its `start` event.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Start {
    /// The job's name (logs of older versions lack it).
    pub job: Option<String>,
    pub params: Option<i64>,
    pub world: Option<u64>,
    pub dp: Option<u64>,
    pub tp: Option<u64>,
    pub zero1: Option<bool>,
    /// Whether the run was fully sharded; older logs lack it.
    pub fsdp: Option<bool>,
    /// Hybrid sharding's shard group size (0: not hybrid); older logs lack it.
    pub shard: Option<u64>,
    /// What the forward pass dropped and the backward recomputed (`none`, `mlp`, `block`);
    /// older logs lack it.
    pub activation_checkpointing: Option<String>,
    pub device: Option<String>,
    pub bf16: Option<bool>,
    /// The compute dtype read back from libtorch (`bf16`, `fp32`); older logs lack it.
    pub precision: Option<String>,
    pub flops_per_token: Option<f64>,
    pub peak_flops: Option<f64>,
    pub train_sequences: Option<u64>,
    pub validation_sequences: Option<u64>,
}

/// One logged window of training steps, ending at `step`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Step {
    pub step: i64,
    /// The planned number of steps.
    pub steps: Option<i64>,
    pub loss: Option<f64>,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    /// Seconds per step over the window.
    pub step_s: Option<f64>,
    /// Share of the window's time spent waiting for data.
    pub data_wait: Option<f64>,
    /// Share of the window's time spent waiting for gradient communication.
    pub collective_wait: Option<f64>,
    /// Seconds per step by phase (absent in older logs).
    pub phases: Option<BTreeMap<String, Option<f64>>>,
    /// Steps in the window (absent in older logs).
    pub window_steps: Option<i64>,
    /// When the window ended, in seconds since the Unix epoch (absent in older logs).
    pub time: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Eval {
    pub step: i64,
    pub val_loss: Option<f64>,
    pub tokens: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Checkpoint {
    pub step: i64,
    pub url: Option<String>,
    /// How long training was held for the save.
    pub pause_s: Option<f64>,
    /// How long the save took, start to commit.
    pub save_s: Option<f64>,
    /// Bytes rank 0 wrote.
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Resumed {
    /// Steps done when training continued (0: a fresh start).
    pub step: i64,
    pub from: Option<String>,
    #[serde(default)]
    pub rejected: Vec<String>,
}

/// What a metrics log says, steps in order with the last value of each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunLog {
    /// The last `start` event (a run restarted on another mesh starts again).
    pub start: Option<Start>,
    /// How many `start` events the log holds.
    pub starts: usize,
    pub steps: Vec<Step>,
    pub evals: Vec<Eval>,
    pub checkpoints: Vec<Checkpoint>,
    /// In log order.
    pub resumed: Vec<Resumed>,
    /// Whether the final weights were written (a `saved` event).
    pub saved: bool,
    /// JSON lines read (a truncated last line not counted).
    pub lines: usize,
}

/// Why a log cannot be read.
#[derive(Debug, Clone, PartialEq)]
pub enum ParseError {
    /// No event at all.
    Empty,
    /// Line `line` (1-based) is not a metrics event.
    Line { line: usize, message: String },
}

/// Phase names in stacking order (bottom first), with their labels: [`Phase::ALL`], with
/// `compute` after `data_wait`, standing for forward, backward and optimizer together in logs
/// without per-phase timing.
pub const PHASES: [(&str, &str); Phase::COUNT + 1] = {
    let mut out = [("compute", "compute"); Phase::COUNT + 1];
    let mut i = 0;
    while i < Phase::COUNT {
        let p = Phase::ALL[i];
        // `compute` takes the place right after the first phase (data wait).
        out[if i == 0 { 0 } else { i + 1 }] = (p.name(), p.label());
        i += 1;
    }
    out
};

impl Step {
    /// Seconds per step by phase. Without `phases` (older logs): the data and collective
    /// wait shares of `step_s`, and the rest as `compute`.
    pub fn phase_seconds(&self) -> Vec<(String, f64)> {
        if let Some(phases) = &self.phases {
            return phases
                .iter()
                .map(|(k, v)| (k.clone(), finite(*v).unwrap_or(0.0).max(0.0)))
                .collect();
        }
        let Some(step_s) = finite(self.step_s) else {
            return Vec::new();
        };
        let share = |v: Option<f64>| finite(v).unwrap_or(0.0).clamp(0.0, 1.0);
        let data = share(self.data_wait) * step_s;
        let collective = share(self.collective_wait) * step_s;
        vec![
            ("data_wait".into(), data),
            ("compute".into(), (step_s - data - collective).max(0.0)),
            ("collective".into(), collective),
        ]
    }
}

/// `Some(v)` for a finite value.
pub fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

impl RunLog {
    /// The last logged step, if any.
    pub fn last_step(&self) -> Option<&Step> {
        self.steps.last()
    }

    /// The planned number of steps, from the last step that names it.
    pub fn planned_steps(&self) -> Option<i64> {
        self.steps.iter().rev().find_map(|s| s.steps)
    }

    /// The training loss of the last step with a finite one.
    pub fn final_loss(&self) -> Option<(i64, f64)> {
        self.steps
            .iter()
            .rev()
            .find_map(|s| finite(s.loss).map(|l| (s.step, l)))
    }

    /// The validation loss of the last evaluation with a finite one.
    pub fn final_val_loss(&self) -> Option<(i64, f64)> {
        self.evals
            .iter()
            .rev()
            .find_map(|e| finite(e.val_loss).map(|l| (e.step, l)))
    }

    /// Mean of a per-window value over the logged windows, weighted by their steps.
    fn mean(&self, value: impl Fn(&Step) -> Option<f64>) -> Option<f64> {
        let (sum, weight) = self
            .steps
            .iter()
            .filter_map(|s| {
                let w = s.window_steps.unwrap_or(1).max(1) as f64;
                finite(value(s)).map(|v| (v * w, w))
            })
            .fold((0.0, 0.0), |(a, b), (v, w)| (a + v, b + w));
        (weight > 0.0).then(|| sum / weight)
    }

    pub fn mean_tokens_per_s(&self) -> Option<f64> {
        self.mean(|s| s.tokens_per_s)
    }

    pub fn mean_mfu(&self) -> Option<f64> {
        self.mean(|s| s.mfu)
    }

    /// Seconds from the start of the first logged window to the end of the last, when the
    /// log has timestamps (`time`).
    pub fn wall_time_s(&self) -> Option<f64> {
        let mut timed = self.steps.iter().filter(|s| finite(s.time).is_some());
        let first = timed.next()?;
        let last = timed.next_back().unwrap_or(first);
        let first_window = match (first.window_steps, finite(first.step_s)) {
            (Some(w), Some(s)) if w > 0 => w as f64 * s,
            _ => 0.0,
        };
        let wall = last.time? - first.time? + first_window;
        (wall > 0.0).then_some(wall)
    }

    /// The phases present in any step, in stacking order (known ones first, then others by
    /// name).
    pub fn phase_names(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.steps {
            for (k, _) in s.phase_seconds() {
                seen.insert(k);
            }
        }
        let mut names: Vec<String> = PHASES
            .iter()
            .filter(|(k, _)| seen.contains(*k))
            .map(|(k, _)| k.to_string())
            .collect();
        names.extend(
            seen.into_iter()
                .filter(|k| !PHASES.iter().any(|(p, _)| p == k)),
        );
        names
    }
}

/// Reads a metrics log. A last line that is not valid JSON and looks cut short (no newline
/// after it, or JSON ending early) is skipped: the process was killed while writing it.
pub fn parse(text: &str) -> Result<RunLog, ParseError> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let ends_with_newline = text.ends_with('\n');
    let mut steps = BTreeMap::new();
    let mut evals = BTreeMap::new();
    let mut checkpoints = BTreeMap::new();
    let mut log = RunLog::default();
    for (i, &(number, line)) in lines.iter().enumerate() {
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                let last = i + 1 == lines.len();
                if last && (!ends_with_newline || e.is_eof()) {
                    break;
                }
                return Err(ParseError::Line {
                    line: number,
                    message: format!("not JSON: {e}"),
                });
            }
        };
        log.lines += 1;
        let fail = |message: String| ParseError::Line {
            line: number,
            message,
        };
        let Some(object) = value.as_object() else {
            return Err(fail(format!(
                "expected a JSON object, found {}",
                json_kind(&value)
            )));
        };
        let Some(kind) = object.get("type") else {
            return Err(fail("no \"type\" field".into()));
        };
        let Some(kind) = kind.as_str().map(str::to_owned) else {
            return Err(fail(format!(
                "\"type\" should be a string, found {}",
                json_kind(kind)
            )));
        };
        fn event<T: serde::de::DeserializeOwned>(
            kind: &str,
            value: serde_json::Value,
        ) -> Result<T, String> {
            serde_json::from_value(value).map_err(|e| format!("a \"{kind}\" event: {e}"))
        }
        let kind = kind.as_str();
        match kind {
            "start" => {
                log.start = Some(event(kind, value).map_err(fail)?);
                log.starts += 1;
            }
            "step" => {
                let s: Step = event(kind, value).map_err(fail)?;
                steps.insert(s.step, s);
            }
            "eval" => {
                let e: Eval = event(kind, value).map_err(fail)?;
                evals.insert(e.step, e);
            }
            "checkpoint" => {
                let c: Checkpoint = event(kind, value).map_err(fail)?;
                checkpoints.insert(c.step, c);
            }
            "resumed" => log.resumed.push(event(kind, value).map_err(fail)?),
            "saved" => log.saved = true,
            _ => {}
        }
    }
    if log.lines == 0 {
        return Err(ParseError::Empty);
    }
    log.steps = steps.into_values().collect();
    log.evals = evals.into_values().collect();
    log.checkpoints = checkpoints.into_values().collect();
    Ok(log)
}

#[cfg(test)]
mod tests;
