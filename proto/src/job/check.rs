//! [`JobConfig::validate`]'s checks of each section's values: the key at fault and what is
//! wrong with it.

use super::*;

/// A failed check: the key at fault and what is wrong with it.
pub(super) type Check = Result<(), (&'static str, String)>;

pub(super) fn fail(key: &'static str, message: String) -> Check {
    Err((key, message))
}

impl CheckpointSpec {
    /// How often checkpoints are written and how many are kept.
    pub(super) fn check(&self) -> Check {
        if self.every < 0 {
            return fail(
                "checkpoint.every",
                format!("must be 0 (never) or a number of steps, got {}", self.every),
            );
        }
        if self.keep_every < 0 {
            return fail(
                "checkpoint.keep_every",
                format!(
                    "must be 0 (none) or a number of steps, got {}",
                    self.keep_every
                ),
            );
        }
        if self.memory_every < 0 {
            return fail(
                "checkpoint.memory_every",
                format!(
                    "must be 0 (off) or a number of steps, got {}",
                    self.memory_every
                ),
            );
        }
        if self.memory_every > 0 && self.every == 0 {
            return fail(
                "checkpoint.memory_every",
                "needs checkpoint.every: snapshots in memory are lost with a rank and its \
                 peer, and the store's checkpoint is what the job falls back to"
                    .into(),
            );
        }
        if self.keep_last < 1 {
            return fail(
                "checkpoint.keep_last",
                "must be at least 1: resuming needs the newest checkpoint".into(),
            );
        }
        Ok(())
    }
}

impl JobConfig {
    /// Snapshots in memory hold each rank's tensors as it holds them, which fully sharded
    /// training frees and refills between steps.
    pub(super) fn check_memory(&self) -> Check {
        if self.checkpoint.memory_every > 0 && self.parallel.fsdp {
            return fail(
                "checkpoint.memory_every",
                "is not available with parallel.fsdp yet: use checkpoint.every alone".into(),
            );
        }
        Ok(())
    }
}

impl ParallelSpec {
    /// The tensor-parallel size and the gradient buckets.
    pub(super) fn check(&self) -> Check {
        if self.tp < 1 {
            return fail("parallel.tp", "must be at least 1".into());
        }
        if self.fsdp && self.zero1 {
            return fail(
                "parallel.fsdp",
                "fsdp shards the optimizer state as zero1 does, and the parameters and \
                 gradients too: set one of them, not both"
                    .into(),
            );
        }
        if self.shard > 0 && !self.fsdp {
            return fail(
                "parallel.shard",
                format!(
                    "shard = {} groups the fully sharded ranks; it needs fsdp = true",
                    self.shard
                ),
            );
        }
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            return fail(
                "parallel.bucket_mb",
                format!("must be positive, got {}", self.bucket_mb),
            );
        }
        Ok(())
    }
}

impl TrainSpec {
    /// Steps, logging, the MFU peak and evaluation.
    pub(super) fn check_schedule(&self) -> Check {
        if self.steps < 1 {
            return fail(
                "train.steps",
                format!("must be at least 1, got {}", self.steps),
            );
        }
        if self.log_every < 1 {
            return fail(
                "train.log_every",
                format!("must be at least 1, got {}", self.log_every),
            );
        }
        if let Some(p) = self.peak_tflops.filter(|p| !(p.is_finite() && *p > 0.0)) {
            return fail(
                "train.peak_tflops",
                format!("must be a positive number of TFLOP/s, got {p}"),
            );
        }
        if self.eval_every < 0 || self.eval_batches < 1 {
            return fail(
                "train.eval_every",
                "eval_every must be >= 0 and eval_batches >= 1".into(),
            );
        }
        Ok(())
    }

    /// Threads, precision and device.
    pub(super) fn check_runtime(&self) -> Check {
        if self.threads < 0 {
            return fail(
                "train.threads",
                format!("must be >= 0, got {}", self.threads),
            );
        }
        if !matches!(self.precision.as_str(), "auto" | "fp32" | "bf16") {
            return fail(
                "train.precision",
                format!("expected auto, fp32 or bf16, got {:?}", self.precision),
            );
        }
        if !matches!(
            self.activation_checkpointing.as_str(),
            "none" | "mlp" | "block"
        ) {
            return fail(
                "train.activation_checkpointing",
                format!(
                    "expected none, mlp or block, got {:?}",
                    self.activation_checkpointing
                ),
            );
        }
        let device_ok = self.device == "auto"
            || self.device == "cpu"
            || self.device == "cuda"
            || self
                .device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !device_ok {
            return fail(
                "train.device",
                format!("expected auto, cpu, cuda or cuda:N, got {:?}", self.device),
            );
        }
        Ok(())
    }
}

impl DataSpec {
    /// One dataset or weighted sources, and the loader's memory.
    pub(super) fn check(&self) -> Check {
        match (&self.path, self.sources.len()) {
            (Some(_), 0) => {}
            (None, 0) => return fail("data", "give data.path or [[data.sources]]".into()),
            (Some(_), _) => {
                return fail(
                    "data",
                    "give data.path or [[data.sources]], not both".into(),
                )
            }
            (None, _) => {
                if let Some(s) = self
                    .sources
                    .iter()
                    .find(|s| !(s.weight.is_finite() && s.weight > 0.0))
                {
                    return fail(
                        "data.sources.weight",
                        format!("must be a positive number, got {} for {}", s.weight, s.path),
                    );
                }
            }
        }
        if self.memory_cap_mb < 1 || self.shuffle_window < 1 {
            return fail(
                "data.memory_cap_mb",
                "memory_cap_mb and shuffle_window must be at least 1".into(),
            );
        }
        Ok(())
    }
}

impl OptimizerSpec {
    /// The learning-rate schedule and AdamW's hyperparameters.
    pub(super) fn check(&self) -> Check {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return fail(
                "optimizer.lr",
                format!("must be a positive number, got {}", self.lr),
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return fail(
                "optimizer.min_lr_ratio",
                format!("must be in [0, 1], got {}", self.min_lr_ratio),
            );
        }
        if self.warmup_steps < 0 {
            return fail(
                "optimizer.warmup_steps",
                format!("must be >= 0, got {}", self.warmup_steps),
            );
        }
        if !matches!(self.schedule.as_str(), "cosine" | "linear" | "constant") {
            return fail(
                "optimizer.schedule",
                format!(
                    "expected cosine, linear or constant, got {:?}",
                    self.schedule
                ),
            );
        }
        for (key, b) in [
            ("optimizer.beta1", self.beta1),
            ("optimizer.beta2", self.beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return fail(key, format!("must be in [0, 1), got {b}"));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return fail(
                "optimizer.eps",
                format!("must be positive, got {}", self.eps),
            );
        }
        if self.weight_decay < 0.0 {
            return fail(
                "optimizer.weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            );
        }
        if self.grad_clip < 0.0 {
            return fail(
                "optimizer.grad_clip",
                format!("must be >= 0 (0 disables), got {}", self.grad_clip),
            );
        }
        Ok(())
    }
}
