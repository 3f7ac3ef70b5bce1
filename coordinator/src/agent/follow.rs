//! What a training process's output tells its agent: the progress, checkpoint and error
//! lines of `kiln train --supervised`, taken in one line at a time.

use kiln_proto::control::Progress;
use kiln_proto::run::Event;

/// What the training process's output says, shared with the heartbeat loop.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) progress: Option<Progress>,
    pub(super) written: u64,
    pub(super) committed: u64,
    /// The last lines it wrote to stderr (the error, when it fails).
    pub(super) tail: Vec<String>,
}

/// Takes in one line of a training process's stdout (a [`Event`]); whether it changes what
/// to report. Lines that are not events are ignored; a value the process wrote as `null`
/// (not finite) is reported as 0.
pub(super) fn follow(line: &str, seen: &std::sync::Mutex<Seen>) -> bool {
    let Ok(event) = Event::from_line(line) else {
        return false;
    };
    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
    let f = |v: f64| if v.is_finite() { v } else { 0.0 };
    let count = |step: i64| u64::try_from(step).unwrap_or(0);
    match event {
        Event::Step {
            step,
            steps,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
            mfu,
            step_s,
            data_wait,
            collective_wait,
            phases,
            ..
        } => {
            let step_s = f(step_s);
            let waiting = (f(data_wait) + f(collective_wait)).clamp(0.0, 1.0);
            let (val_loss, val_step) = s.progress.map_or((0.0, 0), |p| (p.val_loss, p.val_step));
            s.progress = Some(Progress {
                val_loss,
                val_step,
                step: count(step),
                steps: count(steps),
                loss: f(loss),
                tokens_per_s: f(tokens_per_s),
                mfu: f(mfu),
                step_s,
                compute_s: step_s * (1.0 - waiting),
                grad_norm: f(grad_norm),
                lr: f(lr),
                phases: phases.to_array().map(f),
            });
            false
        }
        Event::Eval { step, val_loss, .. } => {
            let p = s.progress.get_or_insert_with(Progress::default);
            p.val_loss = f(val_loss);
            p.val_step = count(step);
            false
        }
        Event::RankObjectWritten { step } => {
            s.written = s.written.max(step);
            true
        }
        Event::Checkpoint { step, url, .. } if !url.is_empty() => {
            s.committed = s.committed.max(count(step));
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::run::Phases;

    /// A line as a supervised training process prints it (a JSON value, keys sorted).
    fn printed(event: &Event) -> String {
        serde_json::to_value(event).unwrap().to_string()
    }

    #[test]
    fn follow_reads_every_field_the_trainer_writes() {
        let seen = std::sync::Mutex::new(Seen::default());
        let phases = Phases {
            data_wait: 0.01,
            forward: 0.1,
            backward: 0.2,
            collective: 0.03,
            optimizer: 0.04,
            checkpoint: 0.05,
        };
        let step = Event::Step {
            step: 20,
            steps: 200,
            loss: 7.25,
            lr: 3e-3,
            grad_norm: 1.5,
            tokens_per_s: 1800.0,
            mfu: 0.4,
            step_s: 0.5,
            data_wait: 0.1,
            collective_wait: 0.2,
            phases,
            window_steps: 10,
            time: 1.79e9,
        };
        assert!(!follow(&printed(&step), &seen));
        let eval = Event::Eval {
            step: 20,
            val_loss: 7.5,
            tokens: 1024,
        };
        assert!(!follow(&printed(&eval), &seen));
        let progress = seen.lock().unwrap().progress.unwrap();
        assert_eq!(
            progress,
            Progress {
                step: 20,
                steps: 200,
                loss: 7.25,
                tokens_per_s: 1800.0,
                mfu: 0.4,
                step_s: 0.5,
                compute_s: 0.5 * (1.0 - (0.1 + 0.2)),
                val_loss: 7.5,
                val_step: 20,
                grad_norm: 1.5,
                lr: 3e-3,
                phases: phases.to_array(),
            }
        );
        // A later step keeps the validation loss.
        assert!(!follow(&step.to_line(), &seen));
        assert_eq!(seen.lock().unwrap().progress.unwrap().val_step, 20);
    }

    #[test]
    fn follow_counts_shards_written_and_checkpoints_committed() {
        let seen = std::sync::Mutex::new(Seen::default());
        assert!(follow(
            &printed(&Event::RankObjectWritten { step: 4 }),
            &seen
        ));
        assert!(follow(r#"{"step":2,"type":"shard_written"}"#, &seen));
        let checkpoint = |url: &str| Event::Checkpoint {
            step: 4,
            url: url.into(),
            pause_s: 0.1,
            save_s: 1.0,
            bytes: 10,
            deleted: vec![],
        };
        // Only rank 0's checkpoint events name the committed manifest.
        assert!(!follow(&printed(&checkpoint("")), &seen));
        assert_eq!(seen.lock().unwrap().committed, 0);
        assert!(follow(
            &printed(&checkpoint("/c/step-4/manifest.json")),
            &seen
        ));
        let s = seen.lock().unwrap();
        assert_eq!((s.written, s.committed), (4, 4));
    }

    #[test]
    fn follow_ignores_other_lines_and_reports_nulls_as_zero() {
        let seen = std::sync::Mutex::new(Seen::default());
        assert!(!follow("not json", &seen));
        assert!(!follow(r#"{"type":"telemetry","gpu":[1]}"#, &seen));
        assert!(seen.lock().unwrap().progress.is_none());
        let line = r#"{"type":"step","step":3,"steps":9,"loss":null,"lr":0.1,"grad_norm":null,"tokens_per_s":10.0,"mfu":0.5,"step_s":1.0,"data_wait":0.5,"collective_wait":0.0,"phases":{"forward":null,"backward":0.25},"window_steps":1,"time":1.0}"#;
        assert!(!follow(line, &seen));
        let p = seen.lock().unwrap().progress.unwrap();
        assert_eq!(
            (p.step, p.loss, p.grad_norm, p.compute_s),
            (3, 0.0, 0.0, 0.5)
        );
        assert_eq!(p.phases, [0.0, 0.0, 0.25, 0.0, 0.0, 0.0]);
    }
}
