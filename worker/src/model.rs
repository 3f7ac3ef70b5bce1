//! The Llama 3 transformer on libtorch.
//!
//! Token embedding, then `n_layers` pre-norm blocks (RMSNorm, grouped-query attention with
//! rotary position embeddings through `scaled_dot_product_attention`, RMSNorm, SwiGLU MLP),
//! a final RMSNorm and the output head (tied to the embedding or not). Parameter names are
//! Hugging Face's, so weights move to and from `transformers` without renaming, and the
//! rotary embedding uses the same half-split ("rotate_half") convention.

use std::ops::Range;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::collective::tcp::TcpRing;
use crate::collective::{chunk_range, Collective, CollectiveError, ReduceOp};
use crate::config::{ConfigError, LlamaConfig};
use crate::params::{ParamSpec, ParamStore, Shard};

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
}

/// Which parameters get weight decay.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecayPolicy {
    pub embeddings: bool,
    pub norms: bool,
}

/// What one micro-batch's forward pass keeps for its backward pass: per piece, the tensor
/// whose gradient the next piece hands back and the detached leaves the piece started from.
///
/// A block is four pieces: `x -> (h1 = norm(x), x2 = x + attn)`, `h1 -> attn` (partial over
/// tensor-parallel ranks), `x2 -> (h2 = norm(x2), x3 = x2 + mlp)` and `h2 -> mlp` (partial).
/// Cutting at the attention and MLP inputs is what lets the "identity forward, all-reduce
/// backward" operator of Megatron's tensor parallelism run between two backward calls; cutting
/// at the block boundary is what lets data parallelism all-reduce a block's gradients while
/// the blocks before it still run their backward.
#[derive(Debug)]
pub struct Tape {
    /// The mean cross-entropy of the micro-batch (unscaled), the same on every rank: a
    /// one-element f64 tensor on the model's device, so reading it is the caller's choice
    /// (a read waits for the device).
    pub loss: Tensor,
    embed: Tensor,
    blocks: Vec<BlockTape>,
    head: HeadTape,
}

#[derive(Debug)]
struct BlockTape {
    x: Tensor,
    h1: Tensor,
    x2: Tensor,
    h1l: Tensor,
    attn: Tensor,
    x2l: Tensor,
    h2: Tensor,
    x3: Tensor,
    h2l: Tensor,
    mlp: Tensor,
}

#[derive(Debug)]
struct HeadTape {
    x: Tensor,
    hn: Tensor,
    hnl: Tensor,
    grads: HeadGrads,
}

/// How the head's backward gets its gradients.
#[derive(Debug)]
enum HeadGrads {
    /// The scaled loss, whose autograd backward gives them (tensor parallelism).
    Loss(Tensor),
    /// Computed already, chunk by chunk during the forward pass: the head weight's gradient
    /// and the gradient of the final norm's output.
    Done { weight: Tensor, hidden: Tensor },
}

/// Bytes of fp32 logits the chunked loss holds at once, whatever the batch (a whole
/// micro-batch's logits are `tokens * vocab * 4` bytes, 206 MB for 1,024 tokens of GPT-2's
/// vocabulary). On the CPU 16 MiB, under glibc's 32 MiB mmap threshold so that the chunks
/// reuse heap memory instead of mapping and faulting in fresh pages each time; on GPUs 1 GiB,
/// enough rows per chunk (2,048 of a 128K vocabulary) to keep the matmuls efficient.
fn loss_chunk_bytes(device: Device) -> i64 {
    match device {
        Device::Cpu => 16 << 20,
        _ => 1 << 30,
    }
}

impl Llama {
    /// A model with all parameters zero; see [`Llama::init`] and `hf::load_weights`.
    pub fn new(config: &LlamaConfig, decay: DecayPolicy, device: Device) -> Self {
        Self::build(config, decay, device, Arc::new(TcpRing::single(0)))
    }

    /// This rank's part of a model split over the tensor-parallel group `tp` (Megatron's
    /// layout): q, k, v, gate and up split by output rows (column-parallel), o and down by
    /// input columns (row-parallel), embedding and head by vocabulary rows; norms replicated.
    pub fn new_parallel(
        config: &LlamaConfig,
        decay: DecayPolicy,
        device: Device,
        tp: Arc<dyn Collective>,
    ) -> Result<Self, ConfigError> {
        Self::check_tensor_parallel(config, tp.size())?;
        Ok(Self::build(config, decay, device, tp))
    }

    /// Whether `config` splits over `tp` tensor-parallel ranks.
    pub fn check_tensor_parallel(config: &LlamaConfig, tp: usize) -> Result<(), ConfigError> {
        let (c, n) = (config, tp as i64);
        if c.n_heads % n != 0 || c.n_kv_heads % n != 0 || c.ffn_dim % n != 0 {
            return Err(ConfigError::Shape(format!(
                "parallel.tp = {n} must divide n_heads ({}), n_kv_heads ({}) and ffn_dim ({})",
                c.n_heads, c.n_kv_heads, c.ffn_dim
            )));
        }
        if c.vocab_size < n {
            return Err(ConfigError::Shape(format!(
                "parallel.tp = {n} exceeds vocab_size {}",
                c.vocab_size
            )));
        }
        Ok(())
    }

    fn build(
        config: &LlamaConfig,
        decay: DecayPolicy,
        device: Device,
        tp: Arc<dyn Collective>,
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
        let shard =
            |dim: usize, start: i64, full: i64| (n > 1).then_some(Shard { dim, start, full });
        let rows = |full: i64, part: i64| shard(0, k * part, full);
        let cols = |full: i64, part: i64| shard(1, k * part, full);
        let vocab_rows = shard(0, local.vocab.start, c.vocab_size);
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
            tp,
            local,
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

    /// This rank's heads of causal self-attention on `h`, through its rows of the output
    /// projection: `[b, t, dim]`, summed over tensor-parallel ranks to give the attention.
    fn attention(&self, blk: &BlockIdx, h: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let c = &self.config;
        let (b, t) = (h.size()[0], h.size()[1]);
        let heads = |w: usize, n: i64| {
            h.linear::<Tensor>(self.p(w), None)
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
            .linear::<Tensor>(self.p(blk.o), None)
    }

    /// This rank's slice of the SwiGLU MLP on `h`, summed over ranks to give the MLP.
    fn mlp(&self, blk: &BlockIdx, h: &Tensor) -> Tensor {
        let gate = h.linear::<Tensor>(self.p(blk.gate), None).silu();
        let up = h.linear::<Tensor>(self.p(blk.up), None);
        (gate * up).linear::<Tensor>(self.p(blk.down), None)
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`, as one autograd graph.
    /// Without tensor parallelism only (generation and reference checks).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        assert_eq!(
            self.tp.size(),
            1,
            "Llama::forward runs without tensor parallelism"
        );
        let c = &self.config;
        let t = tokens.size2().map_or(0, |(_, t)| t);
        let (cos, sin) = self.rope(t);
        let mut x = Tensor::embedding(self.p(self.embed), tokens, -1, false, false);
        for blk in &self.blocks {
            let h = x.rms_norm([c.dim], Some(self.p(blk.attn_norm)), c.norm_eps);
            x = &x + self.attention(blk, &h, &cos, &sin);
            let h = x.rms_norm([c.dim], Some(self.p(blk.mlp_norm)), c.norm_eps);
            x = &x + self.mlp(blk, &h);
        }
        let x = x.rms_norm([c.dim], Some(self.p(self.norm)), c.norm_eps);
        x.linear::<Tensor>(self.p(self.head), None)
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

    /// The sum over tensor-parallel ranks of `t`, as a constant (no gradient flows through
    /// it: the piece that produced `t` receives the sum's gradient as its own).
    fn tp_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        if self.tp.size() == 1 {
            return Ok(t.detach());
        }
        let s = t.detach().contiguous().copy();
        self.tp.all_reduce(&s, ReduceOp::Sum)?;
        Ok(s)
    }

    /// A gradient that is partial on each tensor-parallel rank (the input gradient of a
    /// column-parallel piece), summed over the ranks.
    fn tp_grad(&self, g: Tensor) -> Result<Tensor, CollectiveError> {
        if self.tp.size() > 1 {
            self.tp.all_reduce(&g, ReduceOp::Sum)?;
        }
        Ok(g)
    }

    /// The forward pass of a training micro-batch, piece by piece (see [`Tape`]). The head's
    /// loss is scaled by `scale` for the backward pass (gradient accumulation); `Tape::loss`
    /// is not.
    pub fn forward_tape(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        scale: f64,
    ) -> Result<Tape, CollectiveError> {
        self.forward_pieces(tokens, targets, scale, true)
    }

    /// [`Llama::forward_tape`], computing the head's gradients only `with_grads`.
    fn forward_pieces(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        scale: f64,
        with_grads: bool,
    ) -> Result<Tape, CollectiveError> {
        let c = &self.config;
        let t = tokens.size2().map_or(0, |(_, t)| t);
        let (cos, sin) = self.rope(t);
        let w = self.p(self.embed);
        let v0 = self.local.vocab.start;
        let embed = if self.tp.size() == 1 {
            Tensor::embedding(w, tokens, -1, false, false)
        } else {
            // Vocabulary-parallel embedding: rows this rank does not hold contribute zeros.
            let mine = self.vocab_mask(tokens);
            let local = (tokens - v0).where_self(&mine, &tokens.zeros_like());
            Tensor::embedding(w, &local, -1, false, false) * mine.unsqueeze(-1).to_kind(w.kind())
        };
        let mut x_next = self.tp_sum(&embed)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let x = leaf(&x_next);
            let h1 = x.rms_norm([c.dim], Some(self.p(blk.attn_norm)), c.norm_eps);
            let h1l = leaf(&h1);
            let attn = self.attention(blk, &h1l, &cos, &sin);
            let x2 = &x + self.tp_sum(&attn)?;
            let x2l = leaf(&x2);
            let h2 = x2l.rms_norm([c.dim], Some(self.p(blk.mlp_norm)), c.norm_eps);
            let h2l = leaf(&h2);
            let mlp = self.mlp(blk, &h2l);
            let x3 = &x2l + self.tp_sum(&mlp)?;
            x_next = x3.shallow_clone();
            blocks.push(BlockTape {
                x,
                h1,
                x2,
                h1l,
                attn,
                x2l,
                h2,
                x3,
                h2l,
                mlp,
            });
        }
        let x = leaf(&x_next);
        let hn = x.rms_norm([c.dim], Some(self.p(self.norm)), c.norm_eps);
        let hnl = leaf(&hn);
        let vl = self.local.vocab.end - v0;
        let targets = targets.reshape([-1]);
        let (grads, value) = if self.tp.size() == 1 {
            let (value, weight, hidden) = self.chunked_loss(
                &hnl,
                &targets,
                scale,
                with_grads,
                loss_chunk_bytes(hnl.device()),
            );
            (HeadGrads::Done { weight, hidden }, value)
        } else {
            let logits = hnl
                .linear::<Tensor>(self.p(self.head), None)
                .to_kind(Kind::Float)
                .reshape([-1, vl]);
            let (loss, value) = self.vocab_parallel_cross_entropy(&logits, &targets)?;
            (HeadGrads::Loss(loss * scale), value)
        };
        Ok(Tape {
            loss: value,
            embed,
            blocks,
            head: HeadTape { x, hn, hnl, grads },
        })
    }

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
    fn chunked_loss(
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

    fn vocab_mask(&self, tokens: &Tensor) -> Tensor {
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
    fn vocab_parallel_cross_entropy(
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

    /// The backward pass of `tape`, piece by piece from the head to the embedding, adding each
    /// parameter's gradient into the flat gradient buffer (replacing what is there when
    /// `overwrite`: the first micro-batch of a step). Calls `on_segment(s)` as soon as
    /// segment `s`'s gradients are complete: the head's, each block's from the last, then the
    /// embedding's (which the tied head also writes to, before).
    pub fn backward(
        &self,
        tape: Tape,
        overwrite: bool,
        on_segment: &mut dyn FnMut(usize),
    ) -> Result<(), CollectiveError> {
        let mut written = vec![!overwrite; self.params.entries().len()];
        let mut put = |i: usize, g: &Tensor| {
            self.params.add_grad(i, g, !written[i]);
            written[i] = true;
        };
        let Tape {
            embed,
            blocks,
            head,
            ..
        } = tape;
        let g_hn = match head.grads {
            HeadGrads::Loss(loss) => {
                let g =
                    Tensor::run_backward(&[&loss], &[self.p(self.head), &head.hnl], false, false);
                put(self.head, &g[0]);
                self.tp_grad(g[1].shallow_clone())?
            }
            HeadGrads::Done { weight, hidden } => {
                put(self.head, &weight);
                hidden.view_as(&head.hnl)
            }
        };
        let g = grads(&[(&head.hn, &g_hn)], &[self.p(self.norm), &head.x]);
        put(self.norm, &g[0]);
        on_segment(self.blocks.len() + 1);
        let mut gx = g[1].shallow_clone();
        for (l, bt) in blocks.iter().enumerate().rev() {
            let b = &self.blocks[l];
            let p = [b.gate, b.up, b.down].map(|i| self.p(i));
            let g = grads(&[(&bt.mlp, &gx)], &[p[0], p[1], p[2], &bt.h2l]);
            put(b.gate, &g[0]);
            put(b.up, &g[1]);
            put(b.down, &g[2]);
            let g_h2 = self.tp_grad(g[3].shallow_clone())?;
            let g = grads(
                &[(&bt.h2, &g_h2), (&bt.x3, &gx)],
                &[self.p(b.mlp_norm), &bt.x2l],
            );
            put(b.mlp_norm, &g[0]);
            let g_x2 = g[1].shallow_clone();
            let p = [b.q, b.k, b.v, b.o].map(|i| self.p(i));
            let g = grads(&[(&bt.attn, &g_x2)], &[p[0], p[1], p[2], p[3], &bt.h1l]);
            put(b.q, &g[0]);
            put(b.k, &g[1]);
            put(b.v, &g[2]);
            put(b.o, &g[3]);
            let g_h1 = self.tp_grad(g[4].shallow_clone())?;
            let g = grads(
                &[(&bt.h1, &g_h1), (&bt.x2, &g_x2)],
                &[self.p(b.attn_norm), &bt.x],
            );
            put(b.attn_norm, &g[0]);
            gx = g[1].shallow_clone();
            on_segment(l + 1);
        }
        let g = grads(&[(&embed, &gx)], &[self.p(self.embed)]);
        put(self.embed, &g[0]);
        on_segment(0);
        Ok(())
    }
}

/// A detached copy of `t`'s value that autograd treats as a leaf: where a piece starts.
fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Gradients of `inputs` given each output's gradient: autograd's `grad(outputs, inputs,
/// grad_outputs)`, through `outputs * grad_outputs` with a gradient of ones.
fn grads(outputs: &[(&Tensor, &Tensor)], inputs: &[&Tensor]) -> Vec<Tensor> {
    let roots: Vec<Tensor> = outputs.iter().map(|(o, g)| *o * g.detach()).collect();
    Tensor::run_backward(&roots, inputs, false, false)
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
mod tests {
    use super::*;
    use crate::config::LlamaConfig;

    fn tiny(tie: bool) -> Llama {
        let mut c = LlamaConfig::preset("tiny").unwrap();
        c.vocab_size = 97;
        c.tie_embeddings = tie;
        let model = Llama::new(&c, DecayPolicy::default(), Device::Cpu);
        model.init(7);
        model
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// An untied tiny model, hidden states for its head (10 rows) and their targets, two of
    /// them ignored (-100).
    fn head_case() -> (Llama, Tensor, Tensor) {
        let model = tiny(false);
        tch::manual_seed(3);
        let h = Tensor::randn([10, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let targets = Tensor::randint(97, [10], (Kind::Int64, Device::Cpu));
        let _ = targets.narrow(0, 4, 2).fill_(-100);
        (model, h, targets)
    }

    /// The chunked head loss gives the value and gradients of `cross_entropy` over the whole
    /// logits through autograd, whatever the chunk size, ignored targets included.
    #[test]
    fn chunked_loss_matches_autograd_cross_entropy() {
        let (model, h, targets) = head_case();
        let w = model.p(model.head);
        let loss = h.linear::<Tensor>(w, None).cross_entropy_loss::<Tensor>(
            &targets,
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        );
        let want = Tensor::run_backward(&[&(&loss * 0.5)], &[w, &h], false, false);
        // 3 rows per chunk (4 chunks, the last one short), then all rows at once.
        for bytes in [3 * 4 * 97, 1 << 20] {
            let (value, gw, gh) = model.chunked_loss(&h, &targets, 0.5, true, bytes);
            let value = value.double_value(&[]);
            assert!((value - loss.double_value(&[])).abs() < 1e-6, "{value}");
            assert!(
                max_diff(&gw, &want[0]) < 1e-6,
                "weight {}",
                max_diff(&gw, &want[0])
            );
            assert!(
                max_diff(&gh, &want[1]) < 1e-6,
                "hidden {}",
                max_diff(&gh, &want[1])
            );
            assert!(gw.abs().sum(Kind::Float).double_value(&[]) > 1e-3);
        }
        let (value, gw, _) = model.chunked_loss(&h, &targets, 0.5, false, 1 << 20);
        let value = value.double_value(&[]);
        assert!((value - loss.double_value(&[])).abs() < 1e-6);
        assert_eq!(gw.numel(), 0);
    }

    /// Relative distance `|a - b| / |b|` (Frobenius norms).
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
    }

    /// Under bf16 autocast the chunked head loss computes what autograd computes over the
    /// whole bf16 logits: the same bf16 matmuls, the fp32 softmax. The value agrees to fp32
    /// rounding (the logits are the same bf16 numbers); the hidden gradient is the same, and
    /// the weight's differs only in where bf16 rounding happens (autograd rounds the whole
    /// `dW` product once, the chunks round each chunk's part, then sum in fp32): within one
    /// bf16 step, 2^-8 relative.
    #[test]
    fn chunked_loss_in_bf16_matches_autograd_cross_entropy_in_bf16() {
        use crate::precision::autocast;
        let (model, h, targets) = head_case();
        let w = model.p(model.head);
        let logits = autocast(true, Device::Cpu, || h.linear::<Tensor>(w, None));
        assert_eq!(logits.kind(), Kind::BFloat16);
        let loss = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            &targets,
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        );
        let want = Tensor::run_backward(&[&(&loss * 0.5)], &[w, &h], false, false);
        let fp32 = model.chunked_loss(&h, &targets, 0.5, true, 1 << 20);
        for bytes in [3 * 4 * 97, 1 << 20] {
            let (value, gw, gh) = autocast(true, Device::Cpu, || {
                model.chunked_loss(&h, &targets, 0.5, true, bytes)
            });
            let value = value.double_value(&[]);
            assert!((value - loss.double_value(&[])).abs() < 1e-5, "{value}");
            assert_eq!((gw.kind(), gh.kind()), (Kind::Float, Kind::Float));
            let (dw, dh) = (rel(&gw, &want[0]), rel(&gh, &want[1]));
            // `dh` rows are whole per chunk: the same bf16 products (measured: 0). `dW` sums
            // chunks: at most one bf16 step apart (measured: 2.6e-3 with 3-row chunks).
            assert!(dh < 1e-6, "hidden {dh:e}");
            assert!(dw < 2f64.powi(-8), "weight {dw:e}");
            // And it is a bf16 result: not the fp32 one.
            assert!(rel(&gh, &fp32.2) > 1e-4, "{:e}", rel(&gh, &fp32.2));
        }
    }

    /// A tiny model (tied or not) and a micro-batch of 2 x 16 tokens for it.
    fn tape_case(tie: bool) -> (Llama, Tensor, Tensor) {
        let model = tiny(tie);
        tch::manual_seed(5);
        let ids = Tensor::randint(97, [2, 17], (Kind::Int64, Device::Cpu));
        let (inputs, targets) = (ids.narrow(1, 0, 16), ids.narrow(1, 1, 16));
        (model, inputs, targets)
    }

    /// Each parameter's gradient of `loss` (one autograd graph), in entry order.
    fn autograd_grads(model: &Llama, loss: &Tensor) -> Vec<Tensor> {
        let views: Vec<Tensor> = model
            .params
            .entries()
            .iter()
            .map(|e| e.view.shallow_clone())
            .collect();
        let refs: Vec<&Tensor> = views.iter().collect();
        Tensor::run_backward(&[loss], &refs, false, false)
    }

    /// The flat gradient the tape's backward writes; the model's buffer is zeroed after.
    fn tape_grads(model: &Llama, tape: Tape) -> Tensor {
        model.backward(tape, true, &mut |_| {}).unwrap();
        let grads = model.params.grad.copy();
        let _ = model.params.grad.shallow_clone().zero_();
        grads
    }

    /// The tape's backward under bf16 autocast gives the gradients of one autograd graph in
    /// bf16 (`Llama::loss` under autocast) and tracks fp32's, within what bf16's 8-bit
    /// mantissa allows through two blocks (relative Frobenius distance per parameter; bounds
    /// 1% and 3%, measured at most 0.6% and 0.9%: the tape rounds at other places than one
    /// graph does, e.g. the chunked head).
    #[test]
    fn tape_gradients_in_bf16_match_autograd_in_bf16_and_track_fp32() {
        use crate::precision::autocast;
        for tie in [true, false] {
            let (model, inputs, targets) = tape_case(tie);
            let fp32 = autograd_grads(&model, &model.loss(&inputs, &targets));
            let bf16_loss = autocast(true, Device::Cpu, || model.loss(&inputs, &targets));
            let bf16 = autograd_grads(&model, &bf16_loss);
            let tape = autocast(true, Device::Cpu, || {
                model.forward_tape(&inputs, &targets, 1.0).unwrap()
            });
            let ours = tape_grads(&model, tape);
            for ((e, b), f) in model.params.entries().iter().zip(&bf16).zip(&fp32) {
                let mine = ours.narrow(0, e.offset, e.numel).view_as(b);
                let (to_bf16, to_fp32) = (rel(&mine, b), rel(&mine, f));
                let name = &e.spec.name;
                assert!(
                    to_bf16 < 1e-2,
                    "tie {tie}: {name} vs bf16 autograd {to_bf16:e}"
                );
                assert!(to_fp32 < 3e-2, "tie {tie}: {name} vs fp32 {to_fp32:e}");
            }
        }
    }

    /// Backward piece by piece over the tape gives the gradients of one autograd graph
    /// (`Llama::loss`), tied and untied.
    #[test]
    fn tape_gradients_match_one_autograd_graph() {
        for tie in [true, false] {
            let (model, inputs, targets) = tape_case(tie);
            let tape = model.forward_tape(&inputs, &targets, 1.0).unwrap();
            let loss = model.loss(&inputs, &targets);
            assert!((tape.loss.double_value(&[]) - loss.double_value(&[])).abs() < 1e-5);
            let ours = tape_grads(&model, tape);
            let theirs = autograd_grads(&model, &loss);
            for (e, g) in model.params.entries().iter().zip(&theirs) {
                let mine = ours.narrow(0, e.offset, e.numel).view_as(g);
                let d = max_diff(&mine, g);
                assert!(d < 1e-5, "tie {tie}: {} differs by {d:e}", e.spec.name);
            }
        }
    }
}
