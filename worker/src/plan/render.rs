//! The plan as text.

use std::fmt::Write as _;

use super::*;

pub(super) fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / GIB)
}

impl Plan {
    /// The plan as text: the job's layout broken down, then the meshes.
    pub fn render(&self) -> String {
        let e = &self.estimate;
        let m = &e.memory;
        let h = &self.hardware;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {:.2}B parameters, seq {} x batch {}, {} on {} {} device(s) of {}, peak {} TFLOP/s at {:.0}% MFU, links {} Gbit/s",
            self.job,
            self.params as f64 / 1e9,
            self.seq_len,
            self.batch_size,
            if self.bf16 { "bf16" } else { "fp32" },
            h.devices,
            h.device,
            gib(h.memory_bytes),
            h.peak_tflops,
            h.mfu * 100.0,
            h.link_gbps,
        );
        let _ = writeln!(out, "\nper rank at {}:", describe(&e.layout));
        let rows = [
            ("parameters (fp32)", m.parameters),
            ("gradients (fp32)", m.gradients),
            ("optimizer state (AdamW)", m.optimizer_state),
            ("optimizer scratch", m.optimizer_scratch),
            ("bf16 weight copies", m.low_precision_weights),
            ("activations, one micro-batch", m.activations),
            ("backward working set", m.backward_working_set),
            ("loss (output head)", m.loss),
            ("runtime", m.runtime),
        ];
        let last = if h.device == "cuda" {
            "final weights (host memory)"
        } else {
            "final weights (after training)"
        };
        for (name, bytes) in rows {
            let _ = writeln!(out, "  {name:<30} {:>12}", gib(bytes));
        }
        let _ = writeln!(out, "  {last:<30} {:>12}", gib(m.final_weights));
        let _ = writeln!(
            out,
            "  {:<30} {:>12}",
            "total (the larger phase)",
            gib(m.total)
        );
        let _ = writeln!(
            out,
            "  (activations without recomputation: {}; FLOPs per token {:.3e}, run {:.3e})",
            gib(m.activations_without_recompute),
            e.flops_per_token,
            e.executed_flops_per_token
        );
        let _ = writeln!(
            out,
            "  step {:.3} s (compute {:.3}, tensor-parallel {:.3}, data-parallel exposed {:.3}), {:.0} tokens/s, {}",
            e.step_s,
            e.compute_s,
            e.tp_comm_s,
            e.dp_comm_s,
            e.tokens_per_s,
            if e.fits { "fits" } else { "DOES NOT FIT" },
        );
        let _ = writeln!(out, "\nmeshes of {} devices:", h.devices);
        let _ = writeln!(
            out,
            "  {:<54} {:>12} {:>10} {:>12}  fits",
            "layout", "memory", "step s", "tokens/s"
        );
        for e in &self.meshes {
            let _ = writeln!(
                out,
                "  {:<54} {:>12} {:>10.3} {:>12.0}  {}",
                describe(&e.layout),
                gib(e.memory.total),
                e.step_s,
                e.tokens_per_s,
                if e.fits { "yes" } else { "no" }
            );
        }
        if let Some(s) = &self.suggestion {
            let _ = writeln!(
                out,
                "\nthe job's layout does not fit; the smallest change that does: {s}"
            );
        }
        out
    }
}
