//! A training rank's OpenTelemetry metrics, recorded from the loop's [`Event`]s. The names,
//! units and meanings are in [`kiln_telemetry::names`]; with export off the instruments are
//! no-ops.

use kiln_telemetry::names::{self, PHASE};
use opentelemetry::metrics::{Counter, Gauge, Histogram};
use opentelemetry::KeyValue;

use kiln_proto::run::{Event, Phase};

pub struct RankMetrics {
    throughput: Gauge<f64>,
    mfu: Gauge<f64>,
    loss: Gauge<f64>,
    validation_loss: Gauge<f64>,
    grad_norm: Gauge<f64>,
    learning_rate: Gauge<f64>,
    step: Gauge<f64>,
    steps: Counter<u64>,
    tokens: Counter<u64>,
    step_duration: Gauge<f64>,
    phase_duration: Counter<f64>,
    save_duration: Histogram<f64>,
    pause_duration: Histogram<f64>,
    checkpoint_size: Counter<u64>,
    checkpoint_saves: Counter<u64>,
    phase_attributes: [[KeyValue; 1]; Phase::COUNT],
    // From the start event: the data-parallel degree and the tokens of one step.
    dp: f64,
}

impl Default for RankMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RankMetrics {
    pub fn new() -> RankMetrics {
        use kiln_telemetry::{f64_counter, f64_gauge, f64_histogram, u64_counter};
        RankMetrics {
            throughput: f64_gauge(&names::TRAIN_THROUGHPUT),
            mfu: f64_gauge(&names::TRAIN_MFU),
            loss: f64_gauge(&names::TRAIN_LOSS),
            validation_loss: f64_gauge(&names::TRAIN_VALIDATION_LOSS),
            grad_norm: f64_gauge(&names::TRAIN_GRAD_NORM),
            learning_rate: f64_gauge(&names::TRAIN_LEARNING_RATE),
            step: f64_gauge(&names::TRAIN_STEP),
            steps: u64_counter(&names::TRAIN_STEPS),
            tokens: u64_counter(&names::TRAIN_TOKENS),
            step_duration: f64_gauge(&names::TRAIN_STEP_DURATION),
            phase_duration: f64_counter(&names::TRAIN_PHASE_DURATION),
            save_duration: f64_histogram(&names::CHECKPOINT_SAVE_DURATION),
            pause_duration: f64_histogram(&names::CHECKPOINT_PAUSE_DURATION),
            checkpoint_size: u64_counter(&names::CHECKPOINT_SIZE),
            checkpoint_saves: u64_counter(&names::CHECKPOINT_SAVES),
            phase_attributes: names::PHASES.map(|p| [KeyValue::new(PHASE, p)]),
            dp: 1.0,
        }
    }

    pub fn record(&mut self, event: &Event) {
        match event {
            Event::Start { dp, .. } => self.dp = (*dp).max(1) as f64,
            Event::Step {
                step,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
                mfu,
                step_s,
                phases,
                window_steps,
                ..
            } => {
                let share = tokens_per_s / self.dp;
                self.throughput.record(share, &[]);
                self.mfu.record(*mfu, &[]);
                self.loss.record(*loss, &[]);
                self.grad_norm.record(*grad_norm, &[]);
                self.learning_rate.record(*lr, &[]);
                self.step.record(*step as f64, &[]);
                self.step_duration.record(*step_s, &[]);
                let n = (*window_steps).max(0) as u64;
                self.steps.add(n, &[]);
                self.tokens
                    .add((share * step_s * n as f64).round() as u64, &[]);
                let seconds = phases.to_array();
                for (s, attributes) in seconds.iter().zip(&self.phase_attributes) {
                    self.phase_duration.add(s * n as f64, attributes);
                }
            }
            Event::Eval { val_loss, .. } => self.validation_loss.record(*val_loss, &[]),
            Event::Checkpoint {
                pause_s,
                save_s,
                bytes,
                ..
            } => {
                self.save_duration.record(*save_s, &[]);
                self.pause_duration.record(*pause_s, &[]);
                self.checkpoint_size.add(*bytes, &[]);
                self.checkpoint_saves.add(1, &[]);
            }
            Event::Saved { .. } | Event::Resumed { .. } | Event::RankObjectWritten { .. } => {}
        }
    }
}
