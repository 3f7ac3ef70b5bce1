//! Sampling text from a model: temperature and top-k, seeded.

use tch::{Kind, Tensor};

use crate::model::Llama;

#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: i64,
    pub seed: u64,
    /// Stop after this token (it is included).
    pub stop_token: Option<u32>,
    /// Run the forward passes under bf16 autocast ([`crate::precision::autocast`]); the
    /// sampling itself is fp32.
    pub bf16: bool,
}

/// Continues `prompt` (non-empty) and returns the new tokens. The context is the last
/// `max_seq_len` tokens.
pub fn generate(model: &Llama, prompt: &[u32], options: &SampleOptions) -> Vec<u32> {
    tch::manual_seed(options.seed as i64);
    let device = model.device();
    let window = model.config.max_seq_len as usize;
    let mut tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut out = Vec::with_capacity(options.max_new_tokens);
    tch::no_grad(|| {
        for _ in 0..options.max_new_tokens {
            let start = tokens.len().saturating_sub(window);
            let ctx = Tensor::from_slice(&tokens[start..])
                .unsqueeze(0)
                .to_device(device);
            let logits = crate::precision::autocast(options.bf16, device, || model.forward(&ctx))
                .select(1, -1)
                .squeeze_dim(0)
                .to_kind(Kind::Float);
            let next = if options.temperature <= 0.0 {
                logits.argmax(0, false)
            } else {
                let mut logits = logits / options.temperature;
                if options.top_k > 0 && options.top_k < logits.size()[0] {
                    let (top, _) = logits.topk(options.top_k, 0, true, true);
                    let threshold = top.select(0, options.top_k - 1);
                    logits =
                        logits.where_scalarother(&logits.ge_tensor(&threshold), f64::NEG_INFINITY);
                }
                logits
                    .softmax(0, Kind::Float)
                    .multinomial(1, false)
                    .squeeze()
            };
            let next = next.int64_value(&[]);
            tokens.push(next);
            out.push(next as u32);
            if options.stop_token == Some(next as u32) {
                break;
            }
        }
    });
    out
}
