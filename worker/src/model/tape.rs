//! The training forward and backward passes of [`Llama`], piece by piece: what a forward
//! pass keeps ([`Tape`]) and the backward pass that walks it from the head to the embedding,
//! with the tensor-parallel sums between pieces.

use tch::{Kind, Tensor};

use super::loss::loss_chunk_bytes;
use super::Llama;
use crate::collective::{CollectiveError, ReduceOp};

/// Activation checkpointing: what a training forward pass drops and its backward pass
/// recomputes from the input it kept (`train.activation_checkpointing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Keep every piece's activations.
    #[default]
    None,
    /// Keep each block's MLP input only; recompute the MLP half (norm, gate, up, the
    /// activation and down: the widest tensors) in its backward.
    Mlp,
    /// Keep each block's input only; recompute the whole block in its backward.
    Block,
}

impl Recompute {
    /// The job file's value: `none`, `mlp` or `block`.
    pub fn parse(s: &str) -> Option<Recompute> {
        match s {
            "none" => Some(Recompute::None),
            "mlp" => Some(Recompute::Mlp),
            "block" => Some(Recompute::Block),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Mlp => "mlp",
            Recompute::Block => "block",
        }
    }
}

/// What one micro-batch's forward pass keeps for its backward pass: per piece, the tensor
/// whose gradient the next piece hands back and the detached leaves the piece started from.
///
/// A block is four pieces: `x -> (h1 = norm(x), x2 = x + attn)`, `h1 -> attn` (partial over
/// tensor-parallel ranks), `x2 -> (h2 = norm(x2), x3 = x2 + mlp)` and `h2 -> mlp` (partial).
/// Cutting at the attention and MLP inputs is what lets the "identity forward, all-reduce
/// backward" operator of Megatron's tensor parallelism run between two backward calls; cutting
/// at the block boundary is what lets data parallelism all-reduce a block's gradients while
/// the blocks before it still run their backward. With [`Recompute`], a block keeps only the
/// input of what it dropped, and its backward runs the dropped half (or both) forward again
/// first, under the same autocast, with the same collectives in the same order.
#[derive(Debug)]
pub struct Tape {
    /// The mean cross-entropy of the micro-batch (unscaled), the same on every rank: a
    /// one-element f64 tensor on the model's device, so reading it is the caller's choice
    /// (a read waits for the device).
    pub loss: Tensor,
    embed: Tensor,
    blocks: Vec<BlockTape>,
    head: HeadTape,
    /// For a recomputation: the rotary tables, and whether autocast was on.
    cos: Tensor,
    sin: Tensor,
    autocast: bool,
}

/// One block's pieces, or what they are recomputed from.
#[derive(Debug)]
enum BlockTape {
    Kept(AttnHalf, MlpHalf),
    /// The MLP half dropped: kept is the attention half, whose `x2` is its input.
    MlpDropped(AttnHalf),
    /// The block's input, detached.
    Dropped(Tensor),
}

/// `x -> (h1, x2 = x + attn)` and `h1 -> attn`.
#[derive(Debug)]
struct AttnHalf {
    x: Tensor,
    h1: Tensor,
    x2: Tensor,
    h1l: Tensor,
    attn: Tensor,
}

/// `x2 -> (h2, x3 = x2 + mlp)` and `h2 -> mlp`.
#[derive(Debug)]
struct MlpHalf {
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

impl Llama {
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
    pub(super) fn forward_pieces(
        &self,
        tokens: &Tensor,
        targets: &Tensor,
        scale: f64,
        with_grads: bool,
    ) -> Result<Tape, CollectiveError> {
        let c = &self.config;
        let t = tokens.size2().map_or(0, |(_, t)| t);
        let (cos, sin) = self.rope(t);
        // Fully sharded: each segment is gathered before it runs, the next one prefetched.
        // It is freed after its forward pass unless autograd keeps its weights for backward;
        // then resharding after forward frees their memory under autograd's saved views.
        let release = !with_grads || self.recompute == Recompute::Block;
        self.params.gather(0)?;
        self.params.prefetch(1);
        let w = self.p(self.embed);
        let v0 = self.local.vocab.start;
        let embed = if self.tp.size() == 1 {
            Tensor::embedding(&w, tokens, -1, false, false)
        } else {
            // Vocabulary-parallel embedding: rows this rank does not hold contribute zeros.
            let mine = self.vocab_mask(tokens);
            let local = (tokens - v0).where_self(&mine, &tokens.zeros_like());
            Tensor::embedding(&w, &local, -1, false, false) * mine.unsqueeze(-1).to_kind(w.kind())
        };
        let mut x_next = self.tp_sum(&embed)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (l, blk) in self.blocks.iter().enumerate() {
            self.params.gather(l + 1)?;
            self.params.prefetch(l + 2);
            let tape = match self.recompute {
                Recompute::None => {
                    let a = self.attn_half(blk, &x_next, &cos, &sin)?;
                    let m = self.mlp_half(blk, &a.x2)?;
                    x_next = m.x3.shallow_clone();
                    BlockTape::Kept(a, m)
                }
                Recompute::Mlp => {
                    let a = self.attn_half(blk, &x_next, &cos, &sin)?;
                    x_next = tch::no_grad(|| self.mlp_half(blk, &a.x2))?.x3;
                    BlockTape::MlpDropped(a)
                }
                Recompute::Block => {
                    let x = x_next.detach();
                    x_next = tch::no_grad(|| {
                        let a = self.attn_half(blk, &x, &cos, &sin)?;
                        self.mlp_half(blk, &a.x2)
                    })?
                    .x3;
                    BlockTape::Dropped(x)
                }
            };
            blocks.push(tape);
            if release {
                self.params.release(l + 1);
            } else {
                self.params.reshard(l + 1);
            }
        }
        let head_segment = self.blocks.len() + 1;
        self.params.gather(head_segment)?;
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
                .linear::<Tensor>(&self.p(self.head), None)
                .to_kind(Kind::Float)
                .reshape([-1, vl]);
            let (loss, value) = self.vocab_parallel_cross_entropy(&logits, &targets)?;
            (HeadGrads::Loss(loss * scale), value)
        };
        if !with_grads {
            self.params.release_all();
        }
        Ok(Tape {
            loss: value,
            embed,
            blocks,
            head: HeadTape { x, hn, hnl, grads },
            cos,
            sin,
            autocast: crate::precision::active(self.device()).is_some(),
        })
    }

    /// `x -> (h1 = norm(x), x2 = x + attn)`, `h1 -> attn`, from `x_in`'s value.
    fn attn_half(
        &self,
        blk: &super::BlockIdx,
        x_in: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<AttnHalf, CollectiveError> {
        let c = &self.config;
        let x = leaf(x_in);
        let h1 = x.rms_norm([c.dim], Some(self.p(blk.attn_norm)), c.norm_eps);
        let h1l = leaf(&h1);
        let attn = self.attention(blk, &h1l, cos, sin);
        let x2 = &x + self.tp_sum(&attn)?;
        Ok(AttnHalf {
            x,
            h1,
            x2,
            h1l,
            attn,
        })
    }

    /// `x2 -> (h2 = norm(x2), x3 = x2 + mlp)`, `h2 -> mlp`, from `x2_in`'s value.
    fn mlp_half(&self, blk: &super::BlockIdx, x2_in: &Tensor) -> Result<MlpHalf, CollectiveError> {
        let c = &self.config;
        let x2l = leaf(x2_in);
        let h2 = x2l.rms_norm([c.dim], Some(self.p(blk.mlp_norm)), c.norm_eps);
        let h2l = leaf(&h2);
        let mlp = self.mlp(blk, &h2l);
        let x3 = &x2l + self.tp_sum(&mlp)?;
        Ok(MlpHalf {
            x2l,
            h2,
            x3,
            h2l,
            mlp,
        })
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
            cos,
            sin,
            autocast,
            ..
        } = tape;
        let device = self.device();
        let g_hn = match head.grads {
            HeadGrads::Loss(loss) => {
                let g =
                    Tensor::run_backward(&[&loss], &[&self.p(self.head), &head.hnl], false, false);
                put(self.head, &g[0]);
                self.tp_grad(g[1].shallow_clone())?
            }
            HeadGrads::Done { weight, hidden } => {
                put(self.head, &weight);
                hidden.view_as(&head.hnl)
            }
        };
        let g = grads(&[(&head.hn, &g_hn)], &[&self.p(self.norm), &head.x]);
        put(self.norm, &g[0]);
        on_segment(self.blocks.len() + 1);
        self.params.release(self.blocks.len() + 1);
        let mut gx = g[1].shallow_clone();
        for (l, tape) in blocks.into_iter().enumerate().rev() {
            let b = &self.blocks[l];
            // Fully sharded: gathered again when the forward pass freed it (recomputation, or
            // resharding after forward), the block before it prefetched.
            self.params.gather(l + 1)?;
            if l > 0 {
                self.params.prefetch(l);
            }
            // A dropped half runs forward again as it first did: same input, same autocast.
            let again = |f: &mut dyn FnMut() -> Result<(), CollectiveError>| {
                crate::precision::autocast(autocast, device, f)
            };
            let (a, m) = match tape {
                BlockTape::Kept(a, m) => (a, m),
                BlockTape::MlpDropped(a) => {
                    let mut m = None;
                    again(&mut || {
                        m = Some(self.mlp_half(b, &a.x2)?);
                        Ok(())
                    })?;
                    (a, m.expect("recomputed"))
                }
                BlockTape::Dropped(x) => {
                    let mut am = None;
                    again(&mut || {
                        let a = self.attn_half(b, &x, &cos, &sin)?;
                        let m = self.mlp_half(b, &a.x2)?;
                        am = Some((a, m));
                        Ok(())
                    })?;
                    am.expect("recomputed")
                }
            };
            let p = [b.gate, b.up, b.down].map(|i| self.p(i));
            let g = grads(&[(&m.mlp, &gx)], &[&p[0], &p[1], &p[2], &m.h2l]);
            put(b.gate, &g[0]);
            put(b.up, &g[1]);
            put(b.down, &g[2]);
            let g_h2 = self.tp_grad(g[3].shallow_clone())?;
            let g = grads(
                &[(&m.h2, &g_h2), (&m.x3, &gx)],
                &[&self.p(b.mlp_norm), &m.x2l],
            );
            put(b.mlp_norm, &g[0]);
            let g_x2 = g[1].shallow_clone();
            let p = [b.q, b.k, b.v, b.o].map(|i| self.p(i));
            let g = grads(&[(&a.attn, &g_x2)], &[&p[0], &p[1], &p[2], &p[3], &a.h1l]);
            put(b.q, &g[0]);
            put(b.k, &g[1]);
            put(b.v, &g[2]);
            put(b.o, &g[3]);
            let g_h1 = self.tp_grad(g[4].shallow_clone())?;
            let g = grads(
                &[(&a.h1, &g_h1), (&a.x2, &g_x2)],
                &[&self.p(b.attn_norm), &a.x],
            );
            put(b.attn_norm, &g[0]);
            gx = g[1].shallow_clone();
            on_segment(l + 1);
            self.params.release(l + 1);
        }
        let g = grads(&[(&embed, &gx)], &[&self.p(self.embed)]);
        put(self.embed, &g[0]);
        on_segment(0);
        self.params.release(0);
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
