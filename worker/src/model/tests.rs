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
    let w = &model.p(model.head);
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
    let w = &model.p(model.head);
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
    let views: Vec<Tensor> = (0..model.params.entries().len())
        .map(|i| model.params.view(i))
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

/// Activation checkpointing changes what is kept, not what is computed: dropping the MLP
/// halves or whole blocks and running them again in the backward gives the same loss and
/// the same gradients, bit for bit, in fp32 and under bf16 autocast (the recomputation runs
/// under the autocast its forward pass ran under, whatever the caller's is then), tied and
/// untied.
#[test]
fn recomputed_activations_give_the_same_gradients_bit_for_bit() {
    use crate::precision::autocast;
    for bf16 in [false, true] {
        for tie in [true, false] {
            let (mut model, inputs, targets) = tape_case(tie);
            let run = |model: &Llama| {
                let tape = autocast(bf16, Device::Cpu, || {
                    model.forward_tape(&inputs, &targets, 0.5).unwrap()
                });
                let loss = tape.loss.double_value(&[]);
                (loss, tape_grads(model, tape))
            };
            let (loss, kept) = run(&model);
            for recompute in [Recompute::Mlp, Recompute::Block] {
                model.recompute = recompute;
                let (again, grads) = run(&model);
                let what = format!("{recompute:?}, bf16 {bf16}, tie {tie}");
                assert_eq!(again.to_bits(), loss.to_bits(), "{what}: loss");
                assert!(
                    grads.equal(&kept),
                    "{what}: gradients differ by {:e}",
                    max_diff(&grads, &kept)
                );
            }
        }
    }
}
