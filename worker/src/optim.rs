//! AdamW with decoupled weight decay over the flat parameter buffer, global-norm gradient
//! clipping, and the learning-rate schedule.
//!
//! The update is the one `torch.optim.AdamW` makes (PyTorch's single-tensor path):
//!
//! ```text
//! p  *= 1 - lr * weight_decay            (decayed parameters only)
//! m   = lerp(m, g, 1 - beta1)
//! v   = beta2 * v + (1 - beta2) * g * g
//! p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Its state (`exp_avg`, `exp_avg_sq`, `step`) is plain tensors Kiln reads and writes.

use tch::{Kind, Tensor};

use crate::params::ParamStore;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// State for the owned ranges of the flat buffer, back to back.
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Updates taken so far.
    pub step: i64,
    /// The ranges of the flat parameter buffer this optimizer updates (flat coordinates): all
    /// of it, with ZeRO-1 this rank's chunk of each gradient bucket, fully sharded its chunk
    /// of each segment.
    owned: Vec<std::ops::Range<i64>>,
    /// Reused for every intermediate, so an update allocates nothing: a fresh buffer the size
    /// of the model costs page faults on every step.
    scratch: Tensor,
}

impl AdamW {
    /// An optimizer for every parameter in `params`.
    pub fn new(config: AdamWConfig, params: &ParamStore) -> Self {
        let whole = 0..params.numel();
        Self::sharded(config, params, std::iter::once(whole).collect())
    }

    /// An optimizer for the `owned` ranges of the flat buffer only (ZeRO-1): its state is
    /// their total size.
    pub fn sharded(
        config: AdamWConfig,
        params: &ParamStore,
        owned: Vec<std::ops::Range<i64>>,
    ) -> Self {
        let total: i64 = owned.iter().map(|r| r.end - r.start).sum();
        let longest = owned.iter().map(|r| r.end - r.start).max().unwrap_or(0);
        let opts = (params.flat.kind(), params.device());
        AdamW {
            config,
            exp_avg: Tensor::zeros([total], opts),
            exp_avg_sq: Tensor::zeros([total], opts),
            step: 0,
            owned,
            scratch: Tensor::empty([longest], opts),
        }
    }

    /// The ranges of the flat buffer this optimizer updates.
    pub fn owned(&self) -> &[std::ops::Range<i64>] {
        &self.owned
    }

    /// One update of the owned parameters from `params.grad`, at learning rate `lr`.
    pub fn step(&mut self, params: &ParamStore, lr: f64) {
        let c = self.config;
        self.step += 1;
        let t = self.step as f64;
        let step_size = lr / (1.0 - c.beta1.powf(t));
        let bias_correction2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        tch::no_grad(|| {
            let mut state_at = 0i64;
            for range in &self.owned {
                let (start, len) = (range.start, range.end - range.start);
                if len == 0 {
                    continue;
                }
                if c.weight_decay != 0.0 {
                    for seg in params.segments() {
                        let (lo, hi) = (seg.range.start.max(start), seg.decay_end.min(range.end));
                        if hi > lo {
                            let _ = params
                                .flat
                                .narrow(0, params.locate(lo), hi - lo)
                                .g_mul_scalar_(1.0 - lr * c.weight_decay);
                        }
                    }
                }
                // Where the range lies in the buffers (elsewhere than `start` when sharded).
                let at = params.locate(start);
                let g = params.grad.narrow(0, at, len);
                let mut p = params.flat.narrow(0, at, len);
                let mut m = self.exp_avg.narrow(0, state_at, len);
                let mut v = self.exp_avg_sq.narrow(0, state_at, len);
                let mut s = self.scratch.narrow(0, 0, len);
                state_at += len;
                // Eight passes over memory in all (decay included), each op in place or into
                // the scratch buffer; the update is memory-bound, so passes are its cost.
                let _ = m.lerp_(&g, 1.0 - c.beta1);
                // v = beta2 * v + (1 - beta2) * g^2, as a lerp towards g^2
                let _ = g.mul_out(&s, &g);
                let _ = v.lerp_(&s, 1.0 - c.beta2);
                if step_size == 0.0 {
                    continue; // a zero learning rate moves nothing (and d would be infinite)
                }
                // p -= step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), as
                // p += m / d with d = -(sqrt(v) / sqrt(1 - beta2^t) + eps) / step_size
                let _ = v.sqrt_out(&s);
                let _ = s
                    .g_mul_scalar_(-1.0 / (bias_correction2_sqrt * step_size))
                    .g_add_scalar_(-c.eps / step_size);
                let _ = p.addcdiv_(&m, &s);
            }
        });
    }
}

/// Scales `grad` in place so its global L2 norm is at most `max_norm` (0 disables), as
/// `torch.nn.utils.clip_grad_norm_` does, and returns the norm before clipping.
pub fn clip_grad_norm(grad: &Tensor, max_norm: f64) -> f64 {
    let norm = grad.norm().to_kind(Kind::Double);
    let total = norm.double_value(&[]);
    if max_norm > 0.0 {
        let coef = (max_norm / (total + 1e-6)).min(1.0);
        if coef < 1.0 {
            let mut g = grad.shallow_clone();
            let _ = g.g_mul_scalar_(coef);
        }
    }
    total
}

/// Learning rate at a step: linear warmup to `lr`, then decay to `lr * min_lr_ratio`.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: i64,
    pub total_steps: i64,
    pub kind: ScheduleKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    Cosine,
    Linear,
    Constant,
}

impl ScheduleKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cosine" => Some(ScheduleKind::Cosine),
            "linear" => Some(ScheduleKind::Linear),
            "constant" => Some(ScheduleKind::Constant),
            _ => None,
        }
    }
}

impl LrSchedule {
    /// The rate for optimizer step `step` (0-based):
    /// - warmup, `step < W`: `lr * (step + 1) / W`;
    /// - then with `p = (step - W) / max(1, total - W - 1)` clamped to [0, 1] and
    ///   `floor = lr * min_lr_ratio`: cosine `floor + (lr - floor) * (1 + cos(pi p)) / 2`,
    ///   linear `lr - (lr - floor) * p`, constant `lr`.
    pub fn at(&self, step: i64) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            return self.lr * (step + 1) as f64 / w as f64;
        }
        let span = (self.total_steps - w - 1).max(1) as f64;
        let p = ((step - w) as f64 / span).clamp(0.0, 1.0);
        let floor = self.lr * self.min_lr_ratio;
        match self.kind {
            ScheduleKind::Cosine => {
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
            ScheduleKind::Linear => self.lr - (self.lr - floor) * p,
            ScheduleKind::Constant => self.lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            lr: 1.0,
            min_lr_ratio: 0.1,
            warmup_steps: 4,
            total_steps: 14,
            kind,
        }
    }

    #[test]
    fn warmup_then_cosine_reaches_the_floor() {
        let s = schedule(ScheduleKind::Cosine);
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert_eq!(s.at(4), 1.0);
        let mid =
            s.at(4 + 9 / 2) - (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 4.0 / 9.0).cos()));
        assert!(mid.abs() < 1e-15);
        assert!((s.at(13) - 0.1).abs() < 1e-15);
        assert!((s.at(100) - 0.1).abs() < 1e-15);
    }

    #[test]
    fn linear_and_constant_follow_their_formulas() {
        let s = schedule(ScheduleKind::Linear);
        assert!((s.at(4 + 3) - (1.0 - 0.9 * 3.0 / 9.0)).abs() < 1e-15);
        assert!((s.at(13) - 0.1).abs() < 1e-15);
        let s = schedule(ScheduleKind::Constant);
        assert_eq!(s.at(13), 1.0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = Tensor::from_slice(&[3.0f32, 4.0]);
        let norm = clip_grad_norm(&g, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped: Vec<f32> = Vec::try_from(&g).unwrap();
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((clipped[0] as f64 - 3.0 * coef).abs() < 1e-6);
        assert!((clipped[1] as f64 - 4.0 * coef).abs() < 1e-6);
        // Below the limit nothing changes.
        let g = Tensor::from_slice(&[0.3f32, 0.4]);
        clip_grad_norm(&g, 1.0);
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![0.3, 0.4]);
    }
}
