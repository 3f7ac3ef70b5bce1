//! The loss of [`Llama`]'s output head for the piecewise training pass: the chunked
//! cross-entropy with closed-form gradients (one rank holds the whole vocabulary) and the
//! vocabulary-parallel cross-entropy (tensor parallelism).

use tch::{Device, Kind, Tensor};

use super::Llama;
use crate::collective::{CollectiveError, ReduceOp};

/// Bytes of fp32 logits the chunked loss holds at once, whatever the batch (a whole
/// micro-batch's logits are `tokens * vocab * 4` bytes, 206 MB for 1,024 tokens of GPT-2's
/// vocabulary). On the CPU 16 MiB, under glibc's 32 MiB mmap threshold so that the chunks
/// reuse heap memory instead of mapping and faulting in fresh pages each time; on GPUs 1 GiB,
/// enough rows per chunk (2,048 of a 128K vocabulary) to keep the matmuls efficient.
pub(super) fn loss_chunk_bytes(device: Device) -> i64 {
    match device {
        Device::Cpu => 16 << 20,
        _ => 1 << 30,
    }
}

impl Llama {
    /// Mean cross-entropy of the head over `h` (`[.., dim]`, the final norm's output) and,
    /// when `with_grads`, its gradients for a loss scaled by `scale`: the head weight's and
    /// `h`'s. The logits are made, used and dropped a chunk of rows at a time
    /// (`chunk_bytes` of fp32 logits: [`loss_chunk_bytes`]), the gradient of each chunk's logits being
    /// `(softmax - onehot) * scale / tokens` in closed form, so no full `[tokens, vocab]`
    /// tensor ever exists: neither the logits nor their log-softmax nor their gradient.
    /// Targets of -100 are ignored, as `cross_entropy` does. Under autocast
    /// ([`crate::precision::autocast`]) the matmuls run in its dtype (bf16), the head weight
    /// and `h` cast to it once per call rather than once per chunk; the softmax, the loss and
    /// the gradients' accumulation are fp32.
    pub(super) fn chunked_loss(
        &self,
        h: &Tensor,
        targets: &Tensor,
        scale: f64,
        with_grads: bool,
        chunk_bytes: i64,
    ) -> (Tensor, Tensor, Tensor) {
        let w = self.p(self.head).detach();
        let vocab = w.size()[0];
        let h = h.detach().reshape([-1, w.size()[1]]);
        // Autocast would cast the (detached, so uncached) weight again for every chunk.
        let low = crate::precision::active(h.device());
        let (w_mm, h_mm) = match low {
            Some(kind) => (w.to_kind(kind), h.to_kind(kind)),
            None => (w.shallow_clone(), h.shallow_clone()),
        };
        let n = h.size()[0];
        let valid = targets.ne(-100);
        // The number of scored targets, kept on the device: reading it would wait for it.
        let count = valid.sum(Kind::Double).clamp_min(1.0);
        let grad_scale = (count.reciprocal() * scale).to_kind(Kind::Float);
        let rows = (chunk_bytes / (4 * vocab)).max(1);
        let mut sum = Tensor::zeros([], (Kind::Double, h.device()));
        let mut grad_w: Option<Tensor> = None;
        let grad_h = with_grads.then(|| Tensor::zeros([n, w.size()[1]], (Kind::Float, h.device())));
        tch::no_grad(|| {
            let mut start = 0;
            while start < n {
                let len = rows.min(n - start);
                let hc = h_mm.narrow(0, start, len);
                let tc = targets.narrow(0, start, len);
                let vc = valid.narrow(0, start, len);
                let safe = tc.where_self(&vc, &tc.zeros_like()).unsqueeze(1);
                let logits = hc.matmul(&w_mm.tr()).to_kind(Kind::Float);
                let lse = logits.logsumexp([1], true);
                let picked = logits.gather(1, &safe, false);
                let per_row = (&lse - &picked).squeeze_dim(1) * vc.to_kind(Kind::Float);
                sum += per_row.sum(Kind::Double);
                if let Some(gh) = &grad_h {
                    // d loss / d logits = (softmax - onehot) * scale / count, on valid rows
                    let mut d = logits;
                    let _ = d.g_sub_(&lse).exp_();
                    let _ = d.scatter_add_(
                        1,
                        &safe,
                        &Tensor::full([len, 1], -1.0, (Kind::Float, d.device())),
                    );
                    let _ = d.g_mul_(&(vc.to_kind(Kind::Float).unsqueeze(1) * &grad_scale));
                    let mut rows_h = gh.narrow(0, start, len);
                    match low {
                        // In fp32 the matmuls write into the gradients directly.
                        None => {
                            let _ = d.mm_out(&rows_h, &w);
                            match grad_w.as_mut() {
                                None => grad_w = Some(d.tr().matmul(&hc)),
                                Some(gw) => {
                                    let _ = gw.addmm_(&d.tr(), &hc);
                                }
                            }
                        }
                        // In bf16 they run on bf16 operands and are accumulated in fp32.
                        Some(kind) => {
                            let d = d.to_kind(kind);
                            rows_h.copy_(&d.matmul(&w_mm));
                            let gw_chunk = d.tr().matmul(&hc);
                            match grad_w.as_mut() {
                                None => grad_w = Some(gw_chunk.to_kind(w.kind())),
                                Some(gw) => {
                                    let _ = gw.g_add_(&gw_chunk);
                                }
                            }
                        }
                    }
                }
                start += len;
            }
        });
        let value = sum / count;
        let empty = || Tensor::zeros([0], (Kind::Float, h.device()));
        (
            value,
            grad_w.unwrap_or_else(empty),
            grad_h.unwrap_or_else(empty),
        )
    }

    pub(super) fn vocab_mask(&self, tokens: &Tensor) -> Tensor {
        let r = &self.local.vocab;
        tokens.ge(r.start).logical_and(&tokens.lt(r.end))
    }

    /// Cross-entropy over logits split by vocabulary rows (`[N, V/tp]` here), as Megatron
    /// computes it: the row maximum, the sum of exponentials and the target's logit are
    /// all-reduced over the group, so no rank ever holds a whole row of logits.
    ///
    /// Returns a surrogate whose gradient with respect to the local logits is exactly the
    /// cross-entropy's, `(softmax - onehot) / N` (global quantities enter as constants), and
    /// the loss value computed from the reduced quantities.
    pub(super) fn vocab_parallel_cross_entropy(
        &self,
        logits: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, Tensor), CollectiveError> {
        let max = logits.detach().amax([-1], false).contiguous();
        self.tp.all_reduce(&max, ReduceOp::Max)?;
        let exp = (logits - max.unsqueeze(1)).exp();
        let sum_local = exp.sum_dim_intlist(-1, false, Kind::Float);
        let sum = sum_local.detach().copy();
        self.tp.all_reduce(&sum, ReduceOp::Sum)?;
        let mine = self.vocab_mask(targets);
        let local = (targets - self.local.vocab.start).where_self(&mine, &targets.zeros_like());
        let target_local =
            logits.gather(1, &local.unsqueeze(1), false).squeeze_dim(1) * mine.to_kind(Kind::Float);
        let target = target_local.detach().copy();
        self.tp.all_reduce(&target, ReduceOp::Sum)?;
        let per_token = sum.log() + &max - &target;
        let value = per_token.to_kind(Kind::Double).mean(Kind::Double);
        let surrogate = (sum_local / &sum - target_local).mean(Kind::Float);
        Ok((surrogate, value))
    }
}
