//! One training step of a preset (default `125m`) on the CPU: forward, backward, gradient
//! clipping and AdamW, exactly as `kiln train` runs them. Prints one JSON line.
//!
//!   cargo bench --bench train_step -- [PRESET] [BATCH] [SEQ] [STEPS] [THREADS] [PRECISION]
//!
//! PRESET is a model preset or `demo` (the shape of jobs/shakespeare-demo.toml); PRECISION
//! is `fp32` or `bf16` (autocast; what ran is read back from libtorch and printed).
//!
//! benches/train_step.sh runs it side by side with the same step in plain PyTorch.

use std::time::Instant;

use kiln_worker::collective::ProcessGroups;
use kiln_worker::config::LlamaConfig;
use kiln_worker::model::{DecayPolicy, Llama};
use kiln_worker::optim::{AdamW, AdamWConfig};
use kiln_worker::parallel::{train_step, DataParallel};
use tch::{Device, Kind, Tensor};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.to_owned());
    let preset = arg(0, "125m");
    let batch: i64 = arg(1, "4").parse().expect("BATCH is an integer");
    let seq: i64 = arg(2, "256").parse().expect("SEQ is an integer");
    let steps: usize = arg(3, "5").parse().expect("STEPS is an integer");
    let threads: i32 = arg(4, "2").parse().expect("THREADS is an integer");
    let bf16 = match arg(5, "fp32").as_str() {
        "fp32" => false,
        "bf16" => true,
        other => panic!("PRECISION is fp32 or bf16, not {other}"),
    };
    tch::set_num_threads(threads);

    let config = if preset == "demo" {
        LlamaConfig {
            vocab_size: 50_257,
            dim: 128,
            n_layers: 4,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 32,
            ffn_dim: 384,
            max_seq_len: 256,
            ..LlamaConfig::preset("tiny").expect("the tiny preset")
        }
    } else {
        LlamaConfig::preset(&preset).expect("a known preset")
    };
    let model = Llama::new(&config, DecayPolicy::default(), Device::Cpu);
    model.init(0);
    let mut optimizer = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        &model.params,
    );
    let mut sync = DataParallel::new(&model, ProcessGroups::single(), 25.0, false);
    tch::manual_seed(1);
    let tokens = Tensor::randint(
        config.vocab_size,
        [batch, seq + 1],
        (Kind::Int64, Device::Cpu),
    );
    let batches = [(tokens.narrow(1, 0, seq), tokens.narrow(1, 1, seq))];

    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let start = Instant::now();
        let stats = train_step(
            &model,
            &mut optimizer,
            &mut sync,
            &batches,
            1e-4,
            1.0,
            bf16,
            &mut || {},
        )
        .expect("a step without collectives");
        let elapsed = start.elapsed().as_secs_f64();
        assert!(stats.loss.is_finite());
        if i >= 2 {
            // the first two steps warm up allocators and caches
            times.push((
                elapsed,
                stats.forward_s + stats.backward_s,
                stats.optimizer_s,
            ));
        }
    }
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, fwd_bwd, optim) = times[times.len() / 2];
    let precision =
        kiln_worker::precision::kind_name(kiln_worker::precision::probe(bf16, Device::Cpu));
    // Peak resident memory of the process, from the kernel.
    let peak_rss_mib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    println!(
        "{{\"system\": \"kiln\", \"preset\": \"{preset}\", \"params\": {}, \"batch\": {batch}, \"seq\": {seq}, \"threads\": {threads}, \"median_step_s\": {median:.4}, \"forward_backward_s\": {fwd_bwd:.4}, \"optimizer_s\": {optim:.4}, \"tokens_per_s\": {:.1}, \"precision\": \"{precision}\", \"peak_rss_mib\": {peak_rss_mib}}}",
        config.num_params(),
        (batch * seq) as f64 / median
    );
}
