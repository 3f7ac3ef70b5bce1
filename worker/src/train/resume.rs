//! Continuing a run from a checkpoint: finding the one `--resume` names, checking that it was
//! written by a run of the same model, data stream and batch ([`compatible`]), and loading it.

use kiln_checkpoint::{CheckpointManifest, CheckpointStore};
use kiln_proto::job::JobConfig;
use kiln_proto::run::TrainState;
use tch::Tensor;

use super::TrainError;
use crate::checkpoint;
use crate::collective::{ProcessGroups, ReduceOp};
use crate::config::LlamaConfig;
use crate::memory::MemoryTier;
use crate::model::Llama;
use crate::optim::AdamW;

/// Where a resumed run starts.
pub(super) struct ResumePoint {
    pub step: i64,
    pub ledger_hash: u64,
    pub from: String,
    pub rejected: Vec<String>,
}

/// What resuming needs of the run being set up.
pub(super) struct Target<'a> {
    pub job: &'a JobConfig,
    pub config: &'a LlamaConfig,
    pub data_id: &'a str,
    pub model: &'a Llama,
    pub groups: &'a ProcessGroups,
}

/// Finds the checkpoint `which` names and loads it into `model` and `optimizer`. With
/// `latest`, a checkpoint any rank cannot use is skipped for the one before it (the ranks
/// agree on which), and a newer snapshot in workers' memory that every rank finds is taken
/// first; a checkpoint named explicitly must load.
pub(super) fn resume(
    which: &str,
    target: &Target,
    optimizer: &mut AdamW,
    memory: Option<&MemoryTier>,
) -> Result<ResumePoint, TrainError> {
    let Target {
        job,
        config,
        data_id,
        model,
        groups,
    } = *target;
    let (store, step) = match which {
        "latest" => (CheckpointStore::open(&job.checkpoint_dir())?, None),
        name if kiln_checkpoint::layout::parse_step_dir(name).is_some() => (
            CheckpointStore::open(&job.checkpoint_dir())?,
            kiln_checkpoint::layout::parse_step_dir(name),
        ),
        url => {
            let trimmed = url.trim_end_matches('/');
            match trimmed.rsplit_once('/') {
                Some((root, last)) if kiln_checkpoint::layout::parse_step_dir(last).is_some() => (
                    CheckpointStore::open(root)?,
                    kiln_checkpoint::layout::parse_step_dir(last),
                ),
                _ => (CheckpointStore::open(trimmed)?, None),
            }
        }
    };
    let candidates = match step {
        Some(n) => vec![store.manifest(n)?],
        None => store.committed()?,
    };
    let fresh = ResumePoint {
        step: 0,
        ledger_hash: 0,
        from: format!("nothing: no checkpoint under {} yet", store.url()),
        rejected: Vec::new(),
    };
    let mut rejected = Vec::new();
    if let (None, Some(memory)) = (step, memory) {
        let newest = candidates.first().map_or(0, |m| m.step);
        if let Some(point) = from_memory(target, optimizer, memory, newest, &mut rejected)? {
            return Ok(point);
        }
    }
    if candidates.is_empty() {
        return Ok(ResumePoint { rejected, ..fresh });
    }
    for m in &candidates {
        let outcome = read_state(m).and_then(|state| {
            compatible(job, config, data_id, m.step, &state)?;
            checkpoint::load(&store, m, model, optimizer)?;
            Ok(state)
        });
        let name = store.display(m.step, "");
        let why = match agree(groups, outcome)? {
            Ok(state) => {
                optimizer.step = state.optimizer_step;
                return Ok(ResumePoint {
                    step: state.steps.unwrap_or(m.step as i64),
                    ledger_hash: state.ledger.hash,
                    from: name,
                    rejected,
                });
            }
            Err(why) => why,
        };
        tracing::warn!("checkpoint {name} rejected: {why}");
        if step.is_some() {
            return Err(TrainError::Resume(why));
        }
        rejected.push(format!("{name}: {why}"));
    }
    Err(TrainError::Resume(format!(
        "no usable checkpoint under {}: {}",
        store.url(),
        rejected.join("; ")
    )))
}

/// The newest snapshot in workers' memory that every rank finds, when it is newer than the
/// store's newest checkpoint (step `newest`), loaded; `None` when there is none or some rank
/// could not load it (said in `rejected`). Every rank calls this, with or without addresses:
/// the ranks agree through three all-reduces.
fn from_memory(
    target: &Target,
    optimizer: &mut AdamW,
    memory: &MemoryTier,
    newest: u64,
    rejected: &mut Vec<String>,
) -> Result<Option<ResumePoint>, TrainError> {
    let world = &target.groups.world;
    let held = memory.held();
    // The newest step every rank has a snapshot of (ranks are at most a few steps apart, and
    // each worker keeps its ranks' last few, so the others still have it too).
    // Minima as maxima of the negated values.
    let all_min = |v: i64| -> Result<i64, TrainError> {
        let flag = Tensor::from_slice(&[-v]);
        world.all_reduce(&flag, ReduceOp::Max)?;
        Ok(-flag.int64_value(&[0]))
    };
    let step = all_min(held.keys().next_back().copied().unwrap_or(0) as i64)? as u64;
    if step <= newest {
        return Ok(None);
    }
    let holders = held.get(&step).cloned().unwrap_or_default();
    if all_min(i64::from(!holders.is_empty()))? == 0 {
        rejected.push(format!(
            "step {step} in workers' memory: some rank has no snapshot of it"
        ));
        return Ok(None);
    }
    let outcome = memory
        .load(step, &holders, target.model, optimizer)
        .map_err(TrainError::Resume)
        .and_then(|(state, addr)| {
            let state = TrainState::from_value(&state).map_err(|e| {
                TrainError::Resume(format!(
                    "snapshot of step {step} has a training state this version cannot read: {e}"
                ))
            })?;
            compatible(target.job, target.config, target.data_id, step, &state)?;
            Ok((state, addr))
        });
    match agree(target.groups, outcome)? {
        Ok((state, addr)) => {
            optimizer.step = state.optimizer_step;
            Ok(Some(ResumePoint {
                step: state.steps.unwrap_or(step as i64),
                ledger_hash: state.ledger.hash,
                from: format!("step {step} in workers' memory (this rank's from {addr})"),
                rejected: std::mem::take(rejected),
            }))
        }
        Err(why) => {
            tracing::warn!("snapshot of step {step} in memory rejected: {why}");
            rejected.push(format!("step {step} in workers' memory: {why}"));
            Ok(None)
        }
    }
}

/// What every rank's attempt to load came to: this rank's value when every rank loaded,
/// else why not (this rank's error, or the highest rank that failed named).
fn agree<T>(
    groups: &ProcessGroups,
    outcome: Result<T, TrainError>,
) -> Result<Result<T, String>, TrainError> {
    // The highest rank that failed, plus one; 0 when every rank loaded it.
    let failed = match &outcome {
        Ok(_) => 0,
        Err(_) => groups.rank as i64 + 1,
    };
    let flag = Tensor::from_slice(&[failed]);
    groups.world.all_reduce(&flag, ReduceOp::Max)?;
    let worst = flag.int64_value(&[0]);
    Ok(match outcome {
        Ok(value) if worst == 0 => Ok(value),
        Ok(_) => Err(format!(
            "rank {} could not load it (see its output)",
            worst - 1
        )),
        Err(e) => Err(e.to_string()),
    })
}

/// The training state checkpoint `m` records.
fn read_state(m: &CheckpointManifest) -> Result<TrainState, TrainError> {
    TrainState::from_value(&m.train_state).map_err(|e| {
        TrainError::Resume(format!(
            "checkpoint step-{} has a training state this version cannot read: {e}",
            m.step
        ))
    })
}

/// How a value a checkpoint may lack reads in a message (`null`: it has none).
fn shown<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "null".to_owned(), |v| v.to_string())
}

/// Refuses the state of checkpoint step `step` when it was written by a run of another
/// model, data stream or batch.
pub(super) fn compatible(
    job: &JobConfig,
    config: &LlamaConfig,
    data_id: &str,
    step: u64,
    s: &TrainState,
) -> Result<(), TrainError> {
    let t = &job.train;
    let differ = |what: &str, theirs: String, ours: String| {
        Err(TrainError::Resume(format!(
            "checkpoint step-{step} was written by a run with {what} {theirs}; this job has {ours}"
        )))
    };
    let model = config.to_hf_json(None);
    if s.model != model {
        return differ(
            "another model shape:",
            s.model.to_string(),
            model.to_string(),
        );
    }
    if s.batch_size != Some(t.batch_size) {
        return differ(
            "train.batch_size",
            shown(s.batch_size),
            t.batch_size.to_string(),
        );
    }
    let c = s.data_cursor.as_ref();
    let seq_len = c.map(|c| c.seq_len);
    if seq_len.and_then(|l| i64::try_from(l).ok()) != Some(t.seq_len) {
        return differ("train.seq_len", shown(seq_len), t.seq_len.to_string());
    }
    let seed = c.map(|c| c.seed);
    if seed != Some(t.seed) {
        return differ("train.seed", shown(seed), t.seed.to_string());
    }
    let window = c.map(|c| c.shuffle_window);
    if window != Some(job.data.shuffle_window) {
        return differ(
            "data.shuffle_window",
            shown(window),
            job.data.shuffle_window.to_string(),
        );
    }
    let dataset = c.map(|c| c.dataset.as_str());
    if dataset != Some(data_id) {
        // As JSON: the dataset id quoted.
        let theirs = shown(dataset.map(serde_json::Value::from));
        return differ("other data:", theirs, data_id.to_string());
    }
    let steps = s.steps.unwrap_or(0);
    if steps > t.steps {
        return differ(
            "more steps done:",
            shown(s.steps),
            format!("train.steps = {}", t.steps),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::run::{DataCursor, LedgerMark};

    fn job() -> JobConfig {
        let mut job = JobConfig::parse(
            r#"
[model]
preset = "tiny"
[data]
path = "/nowhere"
[train]
steps = 100
batch_size = 8
micro_batch_size = 4
seq_len = 32
[output]
dir = "out"
"#,
            std::path::Path::new("job.toml"),
        )
        .unwrap();
        job.data.shuffle_window = 64;
        job
    }

    fn state(job: &JobConfig, config: &LlamaConfig) -> TrainState {
        let t = &job.train;
        TrainState {
            steps: Some(40),
            optimizer_step: 40,
            lr_next: 1e-3,
            data_cursor: Some(DataCursor {
                next_sample: (40 * t.batch_size) as u64,
                seed: t.seed,
                seq_len: t.seq_len as u64,
                shuffle_window: job.data.shuffle_window,
                dataset: "data-1".into(),
            }),
            ledger: LedgerMark { steps: 40, hash: 9 },
            model: config.to_hf_json(None),
            batch_size: Some(t.batch_size),
            ..TrainState::default()
        }
    }

    #[test]
    fn compatible_refuses_another_run_and_says_why() {
        let job = job();
        let config = LlamaConfig::from_spec(&job.model).unwrap();
        let ok = state(&job, &config);
        assert!(compatible(&job, &config, "data-1", 40, &ok).is_ok());
        let refused = |s: &TrainState, data: &str| match compatible(&job, &config, data, 40, s) {
            Err(TrainError::Resume(why)) => why,
            other => panic!("{other:?}"),
        };
        let why = refused(&ok, "data-2");
        assert_eq!(
            why,
            "checkpoint step-40 was written by a run with other data: \"data-1\"; this job has data-2"
        );
        let mut s = ok.clone();
        s.batch_size = Some(16);
        assert!(refused(&s, "data-1").contains("train.batch_size 16; this job has 8"));
        // What an older or foreign checkpoint lacks is shown as JSON's null.
        s.batch_size = None;
        assert!(refused(&s, "data-1").contains("train.batch_size null;"));
        let mut s = ok.clone();
        s.data_cursor = None;
        assert!(refused(&s, "data-1").contains("train.seq_len null;"));
        let mut s = ok.clone();
        s.steps = Some(200);
        assert!(
            refused(&s, "data-1").contains("more steps done: 200; this job has train.steps = 100")
        );
        let mut s = ok;
        s.model = serde_json::Value::Null;
        assert!(refused(&s, "data-1").contains("another model shape: null;"));
    }
}
