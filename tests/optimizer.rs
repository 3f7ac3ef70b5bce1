//! Kiln's AdamW and gradient clipping against `torch.optim.AdamW` and
//! `torch.nn.utils.clip_grad_norm_` on the same parameters and gradients.

mod common;

use common::*;
use kiln_worker::optim::{clip_grad_norm, AdamW, AdamWConfig};
use kiln_worker::params::{ParamSpec, ParamStore};
use tch::{Device, Tensor};

#[test]
fn adamw_matches_torch_over_six_steps() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("adamw.safetensors");
    run_python("adamw_ref.py", &[path_str(&file)]);
    let tensors = Tensor::read_safetensors(&file).unwrap();
    let get = |name: String| {
        tensors
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let decay: Vec<f32> = Vec::try_from(&get("decay".into())).unwrap();
    let lrs: Vec<f64> = Vec::try_from(&get("lr".into())).unwrap();
    let norms: Vec<f64> = Vec::try_from(&get("norms".into())).unwrap();
    let n = decay.len();

    // The three tensors in one segment; the decayed ones are laid out first.
    let specs = (0..n)
        .map(|i| ParamSpec {
            name: format!("p{i}"),
            shape: get(format!("p{i}")).size(),
            decay: decay[i] == 1.0,
            segment: 0,
            shard: None,
        })
        .collect();
    let store = ParamStore::new(&["all".to_owned()], specs, Device::Cpu);
    for i in 0..n {
        store.set(i, &get(format!("p{i}")));
    }
    let mut adamw = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        &store,
    );
    for (k, lr) in lrs.iter().enumerate() {
        let grads: Vec<Tensor> = (0..n).map(|i| get(format!("g{k}_{i}"))).collect();
        store.accumulate_grads(&grads, true);
        let norm = clip_grad_norm(&store.grad, 1.0);
        assert!(
            (norm - norms[k]).abs() <= 1e-6 * norms[k],
            "step {k}: grad norm {norm} vs torch {}",
            norms[k]
        );
        adamw.step(&store, *lr);
    }
    let max_diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    for (i, e) in store.entries().iter().enumerate() {
        let (o, len) = (e.offset, e.numel);
        let shape = e.spec.shape.as_slice();
        let checks = [
            (
                "parameter",
                store.view(i).detach(),
                get(format!("final_p{i}")),
            ),
            (
                "exp_avg",
                adamw.exp_avg.narrow(0, o, len).view(shape),
                get(format!("exp_avg{i}")),
            ),
            (
                "exp_avg_sq",
                adamw.exp_avg_sq.narrow(0, o, len).view(shape),
                get(format!("exp_avg_sq{i}")),
            ),
        ];
        for (what, ours, theirs) in checks {
            let d = max_diff(&ours, &theirs);
            assert!(d <= 1e-6, "tensor {i} {what}: max difference {d:e}");
        }
    }
    // The parameters moved, so the comparison above is not vacuous.
    assert!(max_diff(&store.view(0).detach(), &get("p0".into())) > 1e-3);
}
