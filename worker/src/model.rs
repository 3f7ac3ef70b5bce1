//! The Llama 3 transformer on libtorch.
//!
//! Token embedding, then `n_layers` pre-norm blocks (RMSNorm, grouped-query attention with
//! rotary position embeddings through `scaled_dot_product_attention`, RMSNorm, SwiGLU MLP),
//! a final RMSNorm and the output head (tied to the embedding or not). Parameter names are
//! Hugging Face's, so weights move to and from `transformers` without renaming, and the
//! rotary embedding uses the same half-split ("rotate_half") convention.

use tch::{Device, Kind, Tensor};

use crate::config::LlamaConfig;
use crate::params::{ParamSpec, ParamStore};

/// Indices of one block's parameters in the [`ParamStore`].
#[derive(Debug, Clone, Copy)]
struct BlockIdx {
    attn_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    mlp_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    pub params: ParamStore,
    embed: usize,
    blocks: Vec<BlockIdx>,
    norm: usize,
    head: usize,
    /// `inv_freq` of the rotary embedding, fp32, on the model's device.
    inv_freq: Tensor,
}

/// Which parameters get weight decay.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecayPolicy {
    pub embeddings: bool,
    pub norms: bool,
}

impl Llama {
    /// A model with all parameters zero; see [`Llama::init`] and `hf::load_weights`.
    pub fn new(config: &LlamaConfig, decay: DecayPolicy, device: Device) -> Self {
        let c = config;
        let (d, hd) = (c.dim, c.head_dim);
        let mut segments = vec!["embed".to_owned()];
        let mut specs = Vec::new();
        let mut add = |name: String, shape: Vec<i64>, decay: bool, segment: usize| {
            specs.push(ParamSpec {
                name,
                shape,
                decay,
                segment,
            });
            specs.len() - 1
        };
        let embed = add(
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, d],
            decay.embeddings,
            0,
        );
        let mut blocks = Vec::new();
        for l in 0..c.n_layers {
            segments.push(format!("layers.{l}"));
            let s = segments.len() - 1;
            let p = |n: &str| format!("model.layers.{l}.{n}.weight");
            blocks.push(BlockIdx {
                attn_norm: add(p("input_layernorm"), vec![d], decay.norms, s),
                q: add(p("self_attn.q_proj"), vec![c.n_heads * hd, d], true, s),
                k: add(p("self_attn.k_proj"), vec![c.n_kv_heads * hd, d], true, s),
                v: add(p("self_attn.v_proj"), vec![c.n_kv_heads * hd, d], true, s),
                o: add(p("self_attn.o_proj"), vec![d, c.n_heads * hd], true, s),
                mlp_norm: add(p("post_attention_layernorm"), vec![d], decay.norms, s),
                gate: add(p("mlp.gate_proj"), vec![c.ffn_dim, d], true, s),
                up: add(p("mlp.up_proj"), vec![c.ffn_dim, d], true, s),
                down: add(p("mlp.down_proj"), vec![d, c.ffn_dim], true, s),
            });
        }
        segments.push("head".into());
        let s = segments.len() - 1;
        let norm = add("model.norm.weight".into(), vec![d], decay.norms, s);
        let head = if c.tie_embeddings {
            embed
        } else {
            add("lm_head.weight".into(), vec![c.vocab_size, d], true, s)
        };
        let params = ParamStore::new(&segments, specs, device);
        let inv_freq = rope_inv_freq(c).to_device(device);
        Llama {
            config: c.clone(),
            params,
            embed,
            blocks,
            norm,
            head,
            inv_freq,
        }
    }

    /// Deterministic initialization from `seed`, as Hugging Face's Llama: every matrix and the
    /// embedding drawn from N(0, 0.02), every RMSNorm gain 1. Values are drawn on the CPU in
    /// parameter order, so they are the same on every device and thread count.
    pub fn init(&self, seed: u64) {
        tch::manual_seed(seed as i64);
        for (i, e) in self.params.entries().iter().enumerate() {
            let value = if e.spec.shape.len() == 1 {
                Tensor::ones(e.spec.shape.as_slice(), (Kind::Float, Device::Cpu))
            } else {
                Tensor::zeros(e.spec.shape.as_slice(), (Kind::Float, Device::Cpu))
                    .normal_(0.0, 0.02)
            };
            self.params.set(i, &value);
        }
    }

    pub fn device(&self) -> Device {
        self.params.device()
    }

    fn p(&self, i: usize) -> &Tensor {
        self.params.view(i)
    }

    /// Rotary `cos` and `sin` for positions `0..t`, each `[t, head_dim]`, fp32.
    fn rope(&self, t: i64) -> (Tensor, Tensor) {
        let pos = Tensor::arange(t, (Kind::Float, self.device()));
        let freqs = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos(), emb.sin())
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let c = &self.config;
        let (b, t) = tokens.size2().unwrap_or((1, 0));
        let (cos, sin) = self.rope(t);
        let mut x = Tensor::embedding(self.p(self.embed), tokens, -1, false, false);
        for blk in &self.blocks {
            let h = x.rms_norm([c.dim], Some(self.p(blk.attn_norm)), c.norm_eps);
            let heads = |w: usize, n: i64| {
                h.linear::<Tensor>(self.p(w), None)
                    .view([b, t, n, c.head_dim])
                    .transpose(1, 2)
            };
            let q = apply_rope(&heads(blk.q, c.n_heads), &cos, &sin);
            let k = apply_rope(&heads(blk.k, c.n_kv_heads), &cos, &sin);
            let v = heads(blk.v, c.n_kv_heads);
            let gqa = c.n_heads != c.n_kv_heads;
            let attn = Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, None, gqa,
            );
            let attn = attn
                .transpose(1, 2)
                .reshape([b, t, c.n_heads * c.head_dim])
                .linear::<Tensor>(self.p(blk.o), None);
            x = &x + attn;
            let h = x.rms_norm([c.dim], Some(self.p(blk.mlp_norm)), c.norm_eps);
            let gate = h.linear::<Tensor>(self.p(blk.gate), None).silu();
            let up = h.linear::<Tensor>(self.p(blk.up), None);
            x = &x + (gate * up).linear::<Tensor>(self.p(blk.down), None);
        }
        let x = x.rms_norm([c.dim], Some(self.p(self.norm)), c.norm_eps);
        x.linear::<Tensor>(self.p(self.head), None)
    }

    /// Mean next-token cross-entropy of `targets` (`[batch, seq]`) given `inputs`, in fp32.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Tensor {
        let logits = self.forward(inputs);
        let v = self.config.vocab_size;
        logits
            .to_kind(Kind::Float)
            .reshape([-1, v])
            .cross_entropy_loss::<Tensor>(
                &targets.reshape([-1]),
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
    }
}

/// `x * cos + rotate_half(x) * sin` on `[b, heads, t, head_dim]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    let (cos, sin) = (cos.to_kind(x.kind()), sin.to_kind(x.kind()));
    x * cos + rotated * sin
}

/// Rotary inverse frequencies, computed in fp32 the way Hugging Face does, with Llama 3.1
/// frequency scaling when the config has it.
fn rope_inv_freq(c: &LlamaConfig) -> Tensor {
    let exponents = Tensor::arange_start_step(0, c.head_dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / c.head_dim as f64;
    let inv_freq = 1.0 / Tensor::from(c.rope_theta as f32).pow(&exponents);
    let Some(s) = c.rope_scaling else {
        return inv_freq;
    };
    let old = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old / s.low_freq_factor;
    let high_freq_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / &inv_freq;
    let inv_freq_llama =
        (&inv_freq / s.factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
    let smooth = (old / &wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    let smoothed: Tensor = (1.0 - &smooth) * &inv_freq_llama / s.factor + &smooth * &inv_freq_llama;
    let is_medium = wavelen
        .lt(high_freq_wavelen)
        .logical_not()
        .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
    smoothed.where_self(&is_medium, &inv_freq_llama)
}
