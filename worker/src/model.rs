//! The Llama 3 transformer on libtorch.
//!
//! Token embedding, then `n_layers` pre-norm blocks (RMSNorm, grouped-query attention with
//! rotary position embeddings through `scaled_dot_product_attention`, RMSNorm, SwiGLU MLP),
//! a final RMSNorm and the output head (tied to the embedding or not). Parameter names are
//! Hugging Face's, so weights move to and from `transformers` without renaming, and the
//! rotary embedding uses the same half-split ("rotate_half") convention.
//!
//! Here: the parameters' layout, the single-graph forward pass and the rotary embedding.
//! The piecewise training pass ([`Tape`], [`Llama::backward`]) is in `tape`, the head's loss
//! for it in `loss`.

use std::ops::Range;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::collective::tcp::TcpRing;
use crate::collective::{chunk_range, Collective, CollectiveError};
use crate::config::{ConfigError, LlamaConfig};
use crate::params::{ParamSpec, ParamStore, Shard};

mod loss;
mod tape;

pub use tape::{Recompute, Tape};

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

/// What one tensor-parallel rank holds: its attention heads, its slice of the MLP and its
/// rows of the vocabulary. With `tp = 1`, everything.
#[derive(Debug, Clone)]
struct LocalDims {
    heads: i64,
    kv_heads: i64,
    vocab: Range<i64>,
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
    /// The tensor-parallel group; a group of one without tensor parallelism.
    tp: Arc<dyn Collective>,
    local: LocalDims,
    /// Which activations a training forward pass drops and its backward pass recomputes.
    pub recompute: Recompute,
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
        Self::build(config, decay, device, Arc::new(TcpRing::single(0)), None)
    }

    /// This rank's part of a model split over the tensor-parallel group `tp` (Megatron's
    /// layout): q, k, v, gate and up split by output rows (column-parallel), o and down by
    /// input columns (row-parallel), embedding and head by vocabulary rows; norms replicated.
    /// With `shard`, this rank keeps only its chunk of each segment of that part among the
    /// shard group ([`crate::fsdp`]).
    pub fn new_parallel(
        config: &LlamaConfig,
        decay: DecayPolicy,
        device: Device,
        tp: Arc<dyn Collective>,
        shard: Option<crate::fsdp::Groups>,
    ) -> Result<Self, ConfigError> {
        config.check_tensor_parallel(tp.size())?;
        Ok(Self::build(config, decay, device, tp, shard))
    }

    fn build(
        config: &LlamaConfig,
        decay: DecayPolicy,
        device: Device,
        tp: Arc<dyn Collective>,
        shard: Option<crate::fsdp::Groups>,
    ) -> Self {
        let c = config;
        let (d, hd) = (c.dim, c.head_dim);
        let (n, k) = (tp.size() as i64, tp.rank() as i64);
        let vocab = chunk_range(c.vocab_size as usize, n as usize, k as usize);
        let local = LocalDims {
            heads: c.n_heads / n,
            kv_heads: c.n_kv_heads / n,
            vocab: vocab.start as i64..vocab.end as i64,
        };
        let ffn = c.ffn_dim / n;
        // Split along `dim` into `n` parts of `part`, this rank's starting at `start`.
        let split =
            |dim: usize, start: i64, full: i64| (n > 1).then_some(Shard { dim, start, full });
        let rows = |full: i64, part: i64| split(0, k * part, full);
        let cols = |full: i64, part: i64| split(1, k * part, full);
        let vocab_rows = split(0, local.vocab.start, c.vocab_size);
        let vl = local.vocab.end - local.vocab.start;
        let mut segments = vec!["embed".to_owned()];
        let mut specs = Vec::new();
        let mut add =
            |name: String, shape: Vec<i64>, decay: bool, segment: usize, shard: Option<Shard>| {
                specs.push(ParamSpec {
                    name,
                    shape,
                    decay,
                    segment,
                    shard,
                });
                specs.len() - 1
            };
        let embed = add(
            "model.embed_tokens.weight".into(),
            vec![vl, d],
            decay.embeddings,
            0,
            vocab_rows,
        );
        let (q_rows, kv_rows) = (local.heads * hd, local.kv_heads * hd);
        let mut blocks = Vec::new();
        for l in 0..c.n_layers {
            segments.push(format!("layers.{l}"));
            let s = segments.len() - 1;
            let p = |n: &str| format!("model.layers.{l}.{n}.weight");
            let (q_full, kv_full) = (c.n_heads * hd, c.n_kv_heads * hd);
            blocks.push(BlockIdx {
                attn_norm: add(p("input_layernorm"), vec![d], decay.norms, s, None),
                q: add(
                    p("self_attn.q_proj"),
                    vec![q_rows, d],
                    true,
                    s,
                    rows(q_full, q_rows),
                ),
                k: add(
                    p("self_attn.k_proj"),
                    vec![kv_rows, d],
                    true,
                    s,
                    rows(kv_full, kv_rows),
                ),
                v: add(
                    p("self_attn.v_proj"),
                    vec![kv_rows, d],
                    true,
                    s,
                    rows(kv_full, kv_rows),
                ),
                o: add(
                    p("self_attn.o_proj"),
                    vec![d, q_rows],
                    true,
                    s,
                    cols(q_full, q_rows),
                ),
                mlp_norm: add(p("post_attention_layernorm"), vec![d], decay.norms, s, None),
                gate: add(
                    p("mlp.gate_proj"),
                    vec![ffn, d],
                    true,
                    s,
                    rows(c.ffn_dim, ffn),
                ),
                up: add(
                    p("mlp.up_proj"),
                    vec![ffn, d],
                    true,
                    s,
                    rows(c.ffn_dim, ffn),
                ),
                down: add(
                    p("mlp.down_proj"),
                    vec![d, ffn],
                    true,
                    s,
                    cols(c.ffn_dim, ffn),
                ),
            });
        }
        segments.push("head".into());
        let s = segments.len() - 1;
        let norm = add("model.norm.weight".into(), vec![d], decay.norms, s, None);
        let head = if c.tie_embeddings {
            embed
        } else {
            add("lm_head.weight".into(), vec![vl, d], true, s, vocab_rows)
        };
        let params = match shard {
            Some(group) => ParamStore::new_sharded(&segments, specs, device, group),
            None => ParamStore::new(&segments, specs, device),
        };
        let inv_freq = rope_inv_freq(c).to_device(device);
        Llama {
            config: c.clone(),
            params,
            embed,
            blocks,
            norm,
            head,
            inv_freq,
            tp,
            local,
            recompute: Recompute::None,
        }
    }

    /// Deterministic initialization from `seed`, as Hugging Face's Llama: every matrix and the
    /// embedding drawn from N(0, 0.02), every RMSNorm gain 1. Whole parameters are drawn on
    /// the CPU in parameter order, then sliced, so the values are the same on every device,
    /// thread count and tensor-parallel layout.
    pub fn init(&self, seed: u64) {
        tch::manual_seed(seed as i64);
        for (i, e) in self.params.entries().iter().enumerate() {
            let shape = e.spec.full_shape();
            let value = if shape.len() == 1 {
                Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
            } else {
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu)).normal_(0.0, 0.02)
            };
            self.params.set_full(i, &value);
        }
    }

    /// This model without its gradient buffer, for generation, evaluation and export.
    pub fn without_grads(mut self) -> Self {
        self.params.release_grads();
        self
    }

    pub fn device(&self) -> Device {
        self.params.device()
    }

    /// The tensor-parallel group.
    pub fn tp(&self) -> &Arc<dyn Collective> {
        &self.tp
    }

    /// The whole of parameter `i`, gathered from the tensor-parallel ranks (every rank of the
    /// group must call this in the same order).
    pub fn full_param(&self, i: usize) -> Result<Tensor, CollectiveError> {
        let spec = &self.params.entries()[i].spec;
        let local = self.params.view(i).detach();
        let Some(shard) = spec.shard else {
            return Ok(local.copy());
        };
        let n = self.tp.size();
        // Gather along dimension 0 of the shard dimension moved first, then move it back.
        let moved = local.movedim([shard.dim as i64], [0]).contiguous();
        let parts: Vec<i64> = (0..n)
            .map(|r| {
                if i == self.embed || i == self.head {
                    chunk_range(self.config.vocab_size as usize, n, r).len() as i64
                } else {
                    shard.full / n as i64
                }
            })
            .collect();
        // Uneven vocabulary slices: pad every rank's part to the largest.
        let max = parts.iter().copied().max().unwrap_or(0);
        let mut rest = moved.size();
        rest[0] = max;
        let padded = Tensor::zeros(rest.as_slice(), (local.kind(), local.device()));
        tch::no_grad(|| padded.narrow(0, 0, moved.size()[0]).copy_(&moved));
        let mut all_shape = rest.clone();
        all_shape[0] = max * n as i64;
        let all = Tensor::zeros(all_shape.as_slice(), (local.kind(), local.device()));
        self.tp.all_gather(&padded, &all)?;
        let pieces: Vec<Tensor> = parts
            .iter()
            .enumerate()
            .map(|(r, &len)| all.narrow(0, r as i64 * max, len))
            .collect();
        Ok(Tensor::cat(&pieces, 0)
            .movedim([0], [shard.dim as i64])
            .contiguous())
    }

    fn p(&self, i: usize) -> Tensor {
        self.params.view(i)
    }

    /// Rotary `cos` and `sin` for positions `0..t`, each `[t, head_dim]`, fp32.
    fn rope(&self, t: i64) -> (Tensor, Tensor) {
        let pos = Tensor::arange(t, (Kind::Float, self.device()));
        let freqs = pos.unsqueeze(1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos(), emb.sin())
    }

    /// This rank's heads of causal self-attention on `h`, through its rows of the output
    /// projection: `[b, t, dim]`, summed over tensor-parallel ranks to give the attention.
    fn attention(&self, blk: &BlockIdx, h: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let c = &self.config;
        let (b, t) = (h.size()[0], h.size()[1]);
        let heads = |w: usize, n: i64| {
            h.linear::<Tensor>(&self.p(w), None)
                .view([b, t, n, c.head_dim])
                .transpose(1, 2)
        };
        let (nh, nkv) = (self.local.heads, self.local.kv_heads);
        let q = apply_rope(&heads(blk.q, nh), cos, sin);
        let k = apply_rope(&heads(blk.k, nkv), cos, sin);
        let v = heads(blk.v, nkv);
        let gqa = nh != nkv;
        let attn =
            Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, gqa);
        attn.transpose(1, 2)
            .reshape([b, t, nh * c.head_dim])
            .linear::<Tensor>(&self.p(blk.o), None)
    }

    /// This rank's slice of the SwiGLU MLP on `h`, summed over ranks to give the MLP.
    fn mlp(&self, blk: &BlockIdx, h: &Tensor) -> Tensor {
        let gate = h.linear::<Tensor>(&self.p(blk.gate), None).silu();
        let up = h.linear::<Tensor>(&self.p(blk.up), None);
        (gate * up).linear::<Tensor>(&self.p(blk.down), None)
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`, as one autograd graph.
    /// Without tensor parallelism only (generation and reference checks).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        assert_eq!(
            self.tp.size(),
            1,
            "Llama::forward runs without tensor parallelism"
        );
        assert!(
            self.params.sharding().is_none(),
            "Llama::forward runs on a store that is not sharded"
        );
        let c = &self.config;
        let t = tokens.size2().map_or(0, |(_, t)| t);
        let (cos, sin) = self.rope(t);
        let mut x = Tensor::embedding(&self.p(self.embed), tokens, -1, false, false);
        for blk in &self.blocks {
            let h = x.rms_norm([c.dim], Some(self.p(blk.attn_norm)), c.norm_eps);
            x = &x + self.attention(blk, &h, &cos, &sin);
            let h = x.rms_norm([c.dim], Some(self.p(blk.mlp_norm)), c.norm_eps);
            x = &x + self.mlp(blk, &h);
        }
        let x = x.rms_norm([c.dim], Some(self.p(self.norm)), c.norm_eps);
        x.linear::<Tensor>(&self.p(self.head), None)
    }

    /// Mean next-token cross-entropy of `targets` (`[batch, seq]`) given `inputs`, in fp32,
    /// as one autograd graph. Without tensor parallelism only.
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

    /// The mean cross-entropy without gradients, with or without tensor parallelism.
    pub fn loss_value(&self, inputs: &Tensor, targets: &Tensor) -> Result<f64, CollectiveError> {
        tch::no_grad(|| self.forward_pieces(inputs, targets, 1.0, false))
            .map(|tape| tape.loss.double_value(&[]))
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

#[cfg(test)]
mod tests;
