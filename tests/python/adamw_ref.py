"""Reference for Kiln's AdamW test (tests/optimizer.rs): torch.optim.AdamW (single-tensor
path) with torch.nn.utils.clip_grad_norm_, over a few steps with given learning rates.

  adamw_ref.py OUT_FILE

Writes `p{i}` (initial parameters), `g{step}_{i}` (gradients), `lr` and `decay` per
parameter group, then `final_p{i}`, `exp_avg{i}`, `exp_avg_sq{i}` and `norms` (the norm
clip_grad_norm_ returned before each step).
"""
import sys

import torch
from safetensors.torch import save_file

STEPS = 6
LRS = [1e-3, 2e-3, 3e-3, 2.5e-3, 1.5e-3, 5e-4]
SHAPES = [(17, 9), (33,), (8, 4, 3)]
DECAY = [1.0, 0.0, 1.0]  # the 1-D tensor is a norm gain: no weight decay

g = torch.Generator().manual_seed(3)
params = [torch.randn(s, generator=g) for s in SHAPES]
grads = [[torch.randn(s, generator=g) * (0.1 + 0.3 * k) for s in SHAPES] for k in range(STEPS)]

out = {f"p{i}": p.clone() for i, p in enumerate(params)}
tensors = [p.clone().requires_grad_(True) for p in params]
opt = torch.optim.AdamW(
    [
        {"params": [tensors[0], tensors[2]], "weight_decay": 0.1},
        {"params": [tensors[1]], "weight_decay": 0.0},
    ],
    lr=LRS[0],
    betas=(0.9, 0.95),
    eps=1e-8,
    foreach=False,
    fused=False,
)
norms = []
for k in range(STEPS):
    for i, t in enumerate(tensors):
        t.grad = grads[k][i].clone()
        out[f"g{k}_{i}"] = grads[k][i].clone()
    norms.append(float(torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.0, foreach=False)))
    for group in opt.param_groups:
        group["lr"] = LRS[k]
    opt.step()
for i, t in enumerate(tensors):
    state = opt.state[t]
    out[f"final_p{i}"] = t.detach().clone()
    out[f"exp_avg{i}"] = state["exp_avg"].clone()
    out[f"exp_avg_sq{i}"] = state["exp_avg_sq"].clone()
out["lr"] = torch.tensor(LRS, dtype=torch.float64)
out["decay"] = torch.tensor(DECAY)
out["norms"] = torch.tensor(norms, dtype=torch.float64)
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
