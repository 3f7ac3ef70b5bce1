//! A training run's record, as the trainer writes it and everything else reads it back:
//!
//! - [`Event`]: one JSON object per line, tagged by `"type"`, that the trainer appends to its
//!   metrics log (`metrics.jsonl`) and prints to a supervising agent (which also gets
//!   [`Event::RankObjectWritten`] lines);
//! - [`Phase`] and [`Phases`]: the parts a step's time is split into, the one list every
//!   phase name (logs, heartbeats, metrics, reports) derives from;
//! - [`TrainState`] and [`DataCursor`]: what a checkpoint records of the run besides its
//!   tensors, enough to continue it exactly.
//!
//! Fields that logs or checkpoints of older versions lack read back as their defaults. A
//! value that was not finite is written as `null` (JSON has no NaN) and reads back as NaN.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What the training loop reports as it goes, one per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Start {
        /// The job's name.
        #[serde(default)]
        job: String,
        params: i64,
        #[serde(default)]
        world: usize,
        #[serde(default)]
        dp: usize,
        #[serde(default)]
        tp: usize,
        #[serde(default)]
        zero1: bool,
        /// Whether parameters, gradients and optimizer state were fully sharded, as the
        /// model's store was built (absent in older logs).
        #[serde(default)]
        fsdp: bool,
        /// Hybrid sharding: the shard group's size, read from the store as built; 0 when the
        /// run was not hybrid (and in older logs).
        #[serde(default)]
        shard: usize,
        /// What the forward pass drops and the backward pass recomputes, as the model ran
        /// it: `none`, `mlp` or `block` (empty in logs written before it was kept).
        #[serde(default)]
        activation_checkpointing: String,
        device: String,
        /// Whether the forward pass ran under bf16 autocast (read back from libtorch).
        bf16: bool,
        /// The dtype a linear layer computes in for this run, read back from libtorch:
        /// `bf16` or `fp32`.
        #[serde(default)]
        precision: String,
        #[serde(deserialize_with = "nan_if_null")]
        flops_per_token: f64,
        #[serde(deserialize_with = "nan_if_null")]
        peak_flops: f64,
        train_sequences: usize,
        validation_sequences: usize,
    },
    Step {
        step: i64,
        steps: i64,
        #[serde(deserialize_with = "nan_if_null")]
        loss: f64,
        #[serde(deserialize_with = "nan_if_null")]
        lr: f64,
        #[serde(deserialize_with = "nan_if_null")]
        grad_norm: f64,
        #[serde(deserialize_with = "nan_if_null")]
        tokens_per_s: f64,
        #[serde(deserialize_with = "nan_if_null")]
        mfu: f64,
        #[serde(deserialize_with = "nan_if_null")]
        step_s: f64,
        /// Share of the window's wall time spent waiting for data.
        #[serde(default, deserialize_with = "nan_if_null")]
        data_wait: f64,
        /// Share of the window's wall time spent waiting, after backward, for gradient
        /// communication that did not overlap with it.
        #[serde(default, deserialize_with = "nan_if_null")]
        collective_wait: f64,
        /// Where a step's time went, in seconds per step over the window.
        #[serde(default)]
        phases: Phases,
        /// Steps in the window this report covers.
        #[serde(default)]
        window_steps: i64,
        /// When the window ended, in seconds since the Unix epoch.
        #[serde(default, deserialize_with = "nan_if_null")]
        time: f64,
    },
    Eval {
        step: i64,
        #[serde(deserialize_with = "nan_if_null")]
        val_loss: f64,
        tokens: u64,
    },
    Saved {
        path: PathBuf,
    },
    /// Training continues from a checkpoint (`step` steps done); `rejected` lists newer
    /// checkpoints that could not be used, and why.
    Resumed {
        step: i64,
        #[serde(default)]
        from: String,
        #[serde(default)]
        rejected: Vec<String>,
    },
    /// A checkpoint was committed. `pause_s`: how long training was held for it.
    Checkpoint {
        step: i64,
        #[serde(default)]
        url: String,
        #[serde(deserialize_with = "nan_if_null")]
        pause_s: f64,
        #[serde(deserialize_with = "nan_if_null")]
        save_s: f64,
        /// Bytes rank 0 wrote (each rank writes about as much).
        bytes: u64,
        #[serde(default)]
        deleted: Vec<u64>,
    },
    /// This rank's object of step `step`'s checkpoint is written (only to a supervising
    /// agent, which then tells the coordinator; never in the metrics log). `shard_written` on
    /// the wire, the name it had before checkpoints' rank objects and datasets' shards were
    /// told apart.
    #[serde(rename = "shard_written")]
    RankObjectWritten {
        step: u64,
    },
}

impl Event {
    /// The event as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads one line as written by [`Event::to_line`] (or by an older version).
    pub fn from_line(line: &str) -> Result<Event, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// A number written as `null` because it was not finite reads back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The parts a step's time is split into, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Waiting for the loader's next batch.
    DataWait,
    /// Forward passes, the loss included.
    Forward,
    /// Backward passes (the gradient all-reduce overlaps with them).
    Backward,
    /// Waiting after backward for gradient communication still in flight.
    Collective,
    /// Clipping, AdamW and the ZeRO-1 gather.
    Optimizer,
    /// Training held by checkpoints: the snapshot of a save, and a step waiting for the
    /// previous save to finish reading the weights.
    Checkpoint,
}

impl Phase {
    /// Every phase, in order: the order of logs, heartbeats and charts.
    pub const ALL: [Phase; 6] = [
        Phase::DataWait,
        Phase::Forward,
        Phase::Backward,
        Phase::Collective,
        Phase::Optimizer,
        Phase::Checkpoint,
    ];

    /// How many phases there are.
    pub const COUNT: usize = Phase::ALL.len();

    /// Its name in logs, heartbeats and metric attributes.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::DataWait => "data_wait",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Collective => "collective",
            Phase::Optimizer => "optimizer",
            Phase::Checkpoint => "checkpoint",
        }
    }

    /// How a person reads it (a chart's legend).
    pub const fn label(self) -> &'static str {
        match self {
            Phase::DataWait => "data wait",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Collective => "collective wait",
            Phase::Optimizer => "optimizer",
            Phase::Checkpoint => "checkpoint",
        }
    }

    /// The phase named `name`, if any.
    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// The names of [`Phase::ALL`], in order.
pub const PHASE_NAMES: [&str; Phase::COUNT] = {
    let mut out = [""; Phase::COUNT];
    let mut i = 0;
    while i < Phase::COUNT {
        out[i] = Phase::ALL[i].name();
        i += 1;
    }
    out
};

/// Seconds per step by phase, averaged over a log window. Apart from `checkpoint`, they add up
/// to about `step_s` (the rest is the loss all-reduce, the ledger and logging); the snapshot
/// part of `checkpoint` is left out of `step_s` and tokens/s, so that those measure training.
///
/// Written as a JSON object keyed by [`Phase::name`], in [`Phase::ALL`]'s order; a phase an
/// older log lacks reads as 0, names it does not know are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Phases {
    pub data_wait: f64,
    pub forward: f64,
    pub backward: f64,
    pub collective: f64,
    pub optimizer: f64,
    pub checkpoint: f64,
}

impl Phases {
    pub fn get(&self, phase: Phase) -> f64 {
        match phase {
            Phase::DataWait => self.data_wait,
            Phase::Forward => self.forward,
            Phase::Backward => self.backward,
            Phase::Collective => self.collective,
            Phase::Optimizer => self.optimizer,
            Phase::Checkpoint => self.checkpoint,
        }
    }

    pub fn get_mut(&mut self, phase: Phase) -> &mut f64 {
        match phase {
            Phase::DataWait => &mut self.data_wait,
            Phase::Forward => &mut self.forward,
            Phase::Backward => &mut self.backward,
            Phase::Collective => &mut self.collective,
            Phase::Optimizer => &mut self.optimizer,
            Phase::Checkpoint => &mut self.checkpoint,
        }
    }

    /// The seconds in [`Phase::ALL`]'s order.
    pub fn to_array(&self) -> [f64; Phase::COUNT] {
        Phase::ALL.map(|p| self.get(p))
    }

    /// From seconds in [`Phase::ALL`]'s order.
    pub fn from_array(seconds: [f64; Phase::COUNT]) -> Phases {
        let mut out = Phases::default();
        for (p, s) in Phase::ALL.into_iter().zip(seconds) {
            *out.get_mut(p) = s;
        }
        out
    }

    /// Adds `other`'s seconds, phase by phase.
    pub fn add(&mut self, other: &Phases) {
        for p in Phase::ALL {
            *self.get_mut(p) += other.get(p);
        }
    }

    /// Every phase's seconds times `k`.
    pub fn scaled(&self, k: f64) -> Phases {
        Phases::from_array(self.to_array().map(|s| s * k))
    }
}

impl Serialize for Phases {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(Phase::COUNT))?;
        for p in Phase::ALL {
            map.serialize_entry(p.name(), &self.get(p))?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Phases {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Phases, D::Error> {
        let given = std::collections::BTreeMap::<String, Option<f64>>::deserialize(d)?;
        let mut out = Phases::default();
        for (name, seconds) in given {
            if let Some(p) = Phase::from_name(&name) {
                *out.get_mut(p) = seconds.unwrap_or(f64::NAN);
            }
        }
        Ok(out)
    }
}

/// The resume state of a data stream: everything needed to continue it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// The next global sample to read.
    pub next_sample: u64,
    pub seed: u64,
    pub seq_len: u64,
    pub shuffle_window: u64,
    /// Identifies the dataset (its shard checksums); a resume on other data is refused.
    pub dataset: String,
}

/// Where the sample ledger (`ledger.jsonl`) stood at a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerMark {
    /// Steps the ledger holds.
    #[serde(default)]
    pub steps: i64,
    /// The wrapping sum of their hashes.
    #[serde(default)]
    pub hash: u64,
}

/// What a checkpoint records of the run besides its tensors (its manifest's `train_state`).
/// Every field may be missing from a checkpoint of an older version (`meta` and `eos_id`
/// were added later) or from one written by another tool; each reads back as its default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done (`None`: the checkpoint's own step counts).
    #[serde(default)]
    pub steps: Option<i64>,
    /// AdamW's step counter.
    #[serde(default)]
    pub optimizer_step: i64,
    /// The learning rate of the next step.
    #[serde(default, deserialize_with = "nan_if_null")]
    pub lr_next: f64,
    /// Where the data stream continues.
    #[serde(default)]
    pub data_cursor: Option<DataCursor>,
    #[serde(default)]
    pub ledger: LedgerMark,
    /// The model's shape, as a Hugging Face `config.json` (without token ids).
    #[serde(default)]
    pub model: serde_json::Value,
    #[serde(default)]
    pub batch_size: Option<i64>,
    /// Kiln's sidecar for the weights (`kiln.json`): the tokenizer and the dataset.
    #[serde(default)]
    pub meta: serde_json::Value,
    /// The tokenizer's end-of-document id.
    #[serde(default)]
    pub eos_id: Option<u32>,
    /// The job as the run parsed it. Kept as written: a job file of an older version may
    /// carry keys this one refuses, and nothing reads it back but people.
    #[serde(default)]
    pub job: serde_json::Value,
}

impl TrainState {
    /// Reads a manifest's `train_state`.
    pub fn from_value(value: &serde_json::Value) -> Result<TrainState, serde_json::Error> {
        TrainState::deserialize(value)
    }

    /// The state as a manifest holds it.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn phases() -> Phases {
        Phases {
            data_wait: 0.005,
            forward: 0.15,
            backward: 0.25,
            collective: 0.01,
            optimizer: 0.05,
            checkpoint: 0.5,
        }
    }

    /// One event of every kind, every field set to something other than its default.
    fn every_event() -> Vec<Event> {
        vec![
            Event::Start {
                job: "tiny".into(),
                params: 3_315_072,
                world: 4,
                dp: 2,
                tp: 2,
                zero1: true,
                fsdp: false,
                shard: 0,
                activation_checkpointing: "block".into(),
                device: "Cuda(0)".into(),
                bf16: true,
                precision: "bf16".into(),
                flops_per_token: 19_988_736.0,
                peak_flops: 1e14,
                train_sequences: 2060,
                validation_sequences: 769,
            },
            Event::Step {
                step: 20,
                steps: 200,
                loss: 7.25,
                lr: 3e-3,
                grad_norm: 1.5,
                tokens_per_s: 1800.0,
                mfu: 0.4,
                step_s: 0.5,
                data_wait: 0.01,
                collective_wait: 0.02,
                phases: phases(),
                window_steps: 10,
                time: 1_790_000_000.25,
            },
            Event::Eval {
                step: 20,
                val_loss: 7.5,
                tokens: 1024,
            },
            Event::Saved {
                path: "/runs/tiny/model".into(),
            },
            Event::Resumed {
                step: 10,
                from: "s3://b/run/step-10/".into(),
                rejected: vec!["step-15: damaged".into()],
            },
            Event::Checkpoint {
                step: 20,
                url: "s3://b/run/step-20/manifest.json".into(),
                pause_s: 0.01,
                save_s: 0.3,
                bytes: 123_456,
                deleted: vec![5, 10],
            },
            Event::RankObjectWritten { step: 20 },
        ]
    }

    #[test]
    fn every_event_reads_back_as_written() {
        for event in every_event() {
            let line = event.to_line();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(Event::from_line(&line).unwrap(), event, "{line}");
        }
    }

    #[test]
    fn events_keep_the_json_they_always_had() {
        let lines: Vec<String> = every_event().iter().map(Event::to_line).collect();
        assert_eq!(
            lines[1],
            r#"{"type":"step","step":20,"steps":200,"loss":7.25,"lr":0.003,"grad_norm":1.5,"tokens_per_s":1800.0,"mfu":0.4,"step_s":0.5,"data_wait":0.01,"collective_wait":0.02,"phases":{"data_wait":0.005,"forward":0.15,"backward":0.25,"collective":0.01,"optimizer":0.05,"checkpoint":0.5},"window_steps":10,"time":1790000000.25}"#
        );
        assert_eq!(
            lines[0],
            r#"{"type":"start","job":"tiny","params":3315072,"world":4,"dp":2,"tp":2,"zero1":true,"fsdp":false,"shard":0,"activation_checkpointing":"block","device":"Cuda(0)","bf16":true,"precision":"bf16","flops_per_token":19988736.0,"peak_flops":100000000000000.0,"train_sequences":2060,"validation_sequences":769}"#
        );
        assert_eq!(
            lines[2],
            r#"{"type":"eval","step":20,"val_loss":7.5,"tokens":1024}"#
        );
        assert_eq!(lines[3], r#"{"type":"saved","path":"/runs/tiny/model"}"#);
        assert_eq!(
            lines[4],
            r#"{"type":"resumed","step":10,"from":"s3://b/run/step-10/","rejected":["step-15: damaged"]}"#
        );
        assert_eq!(
            lines[5],
            r#"{"type":"checkpoint","step":20,"url":"s3://b/run/step-20/manifest.json","pause_s":0.01,"save_s":0.3,"bytes":123456,"deleted":[5,10]}"#
        );
        assert_eq!(lines[6], r#"{"type":"shard_written","step":20}"#);
    }

    #[test]
    fn lines_of_older_versions_still_read() {
        // Before the job name, the mesh and the compute dtype were logged.
        let start = r#"{"type":"start","params":7220480,"device":"Cpu","bf16":false,"flops_per_token":1.0,"peak_flops":1.0,"train_sequences":1,"validation_sequences":0}"#;
        let Event::Start {
            job,
            world,
            precision,
            params,
            ..
        } = Event::from_line(start).unwrap()
        else {
            panic!()
        };
        assert_eq!((job.as_str(), world, precision.as_str()), ("", 0, ""));
        assert_eq!(params, 7220480);
        // Before wait shares and per-phase timing; a diverged loss written as null.
        let step = r#"{"type":"step","step":10,"steps":200,"loss":null,"lr":0.0015,"grad_norm":1.6,"tokens_per_s":1758.0,"mfu":0.41,"step_s":1.0}"#;
        let Event::Step {
            step,
            loss,
            phases,
            window_steps,
            time,
            data_wait,
            ..
        } = Event::from_line(step).unwrap()
        else {
            panic!()
        };
        assert_eq!((step, window_steps, time, data_wait), (10, 0, 0.0, 0.0));
        assert!(loss.is_nan());
        assert_eq!(phases, Phases::default());
        let checkpoint = r#"{"type":"checkpoint","step":2,"pause_s":0.1,"save_s":1.0,"bytes":10}"#;
        assert_eq!(
            Event::from_line(checkpoint).unwrap(),
            Event::Checkpoint {
                step: 2,
                url: String::new(),
                pause_s: 0.1,
                save_s: 1.0,
                bytes: 10,
                deleted: vec![],
            }
        );
        // Phases a log lacks read as 0; names it does not know are ignored.
        let p: Phases = serde_json::from_str(r#"{"forward":0.2,"zeta":1.0}"#).unwrap();
        assert_eq!(
            p,
            Phases {
                forward: 0.2,
                ..Phases::default()
            }
        );
    }

    #[test]
    fn non_finite_values_are_written_as_null_and_read_back_as_nan() {
        let event = Event::Eval {
            step: 3,
            val_loss: f64::INFINITY,
            tokens: 8,
        };
        let line = event.to_line();
        assert_eq!(
            line,
            r#"{"type":"eval","step":3,"val_loss":null,"tokens":8}"#
        );
        let Event::Eval { val_loss, .. } = Event::from_line(&line).unwrap() else {
            panic!()
        };
        assert!(val_loss.is_nan());
    }

    #[test]
    fn one_list_of_phases() {
        assert_eq!(
            PHASE_NAMES,
            [
                "data_wait",
                "forward",
                "backward",
                "collective",
                "optimizer",
                "checkpoint"
            ]
        );
        let written: Value = serde_json::to_value(phases()).unwrap();
        let keys: Vec<&str> = written
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut names = PHASE_NAMES.to_vec();
        // A JSON object's keys may come back sorted.
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        names.sort_unstable();
        assert_eq!(sorted, names);
        for (k, p) in Phase::ALL.into_iter().enumerate() {
            assert_eq!(Phase::from_name(p.name()), Some(p));
            assert_eq!(phases().to_array()[k], phases().get(p));
            assert_eq!(written[p.name()], phases().get(p));
        }
        assert_eq!(Phases::from_array(phases().to_array()), phases());
        let mut sum = phases();
        sum.add(&phases());
        assert_eq!(sum, phases().scaled(2.0));
    }

    fn state() -> TrainState {
        TrainState {
            steps: Some(40),
            optimizer_step: 40,
            lr_next: 0.0025,
            data_cursor: Some(DataCursor {
                next_sample: 640,
                seed: 7,
                seq_len: 128,
                shuffle_window: 4096,
                dataset: "abc,def".into(),
            }),
            ledger: LedgerMark {
                steps: 40,
                hash: 0xdead_beef,
            },
            model: json!({ "hidden_size": 64, "num_hidden_layers": 2 }),
            batch_size: Some(16),
            meta: json!({ "tokenizer": "byte", "eos_id": 0 }),
            eos_id: Some(0),
            job: json!({ "name": "tiny", "train": { "steps": 100 } }),
        }
    }

    #[test]
    fn the_state_reads_back_as_written() {
        let value = state().to_value();
        assert_eq!(TrainState::from_value(&value).unwrap(), state());
        // The keys a checkpoint has always had.
        for key in [
            "steps",
            "optimizer_step",
            "lr_next",
            "data_cursor",
            "ledger",
            "model",
            "batch_size",
            "meta",
            "eos_id",
            "job",
        ] {
            assert!(value.get(key).is_some(), "{key}");
        }
        assert_eq!(
            value["ledger"],
            json!({ "steps": 40, "hash": 0xdead_beef_u64 })
        );
        assert_eq!(value["data_cursor"]["next_sample"], 640);
    }

    #[test]
    fn the_state_of_older_checkpoints_still_reads() {
        // As written before the weights' sidecar and end-of-document id were recorded.
        let mut old = state().to_value();
        let o = old.as_object_mut().unwrap();
        o.remove("meta");
        o.remove("eos_id");
        o.insert("retired".into(), json!(1));
        let s = TrainState::from_value(&old).unwrap();
        assert_eq!((s.meta, s.eos_id), (Value::Null, None));
        assert_eq!(s.steps, Some(40));
        // Not a training state at all (a benchmark's): every field its default.
        let s = TrainState::from_value(&json!({ "step": 3, "bench": "checkpoint" })).unwrap();
        assert_eq!(s, TrainState::default());
    }
}
