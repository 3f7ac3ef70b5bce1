"""The plain-PyTorch peer of benches/gpu/check.sh: the same Llama shape as a Kiln preset,
trained on one GPU the way a careful PyTorch user would write it: bf16 autocast over fp32
master weights, F.scaled_dot_product_attention (flash attention on CUDA), F.rms_norm,
torch.optim.AdamW(fused=True), clip_grad_norm_ (foreach), optionally torch.compile.
Random tokens (the data does not change the arithmetic). Prints one JSON line.

  python3 benches/gpu/peer.py --preset 1b --batch 8 --seq 2048 --steps 20 [--compile]

MFU counts FLOPs as Kiln does (PaLM appendix B: 6 N + 12 L H Dh T per token, N without an
untied input embedding) against --peak-tflops (the measured bf16 matmul ceiling).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train_step_torch import PRESETS, Llama  # noqa: E402


def flops_per_token(model, preset, seq):
    vocab, dim, layers, heads, kv_heads, ffn, tied = PRESETS[preset]
    n = sum(p.numel() for p in model.parameters())
    if not tied:
        n -= vocab * dim
    return 6.0 * n + 12.0 * layers * heads * (dim // heads) * seq


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--micro", type=int, default=0, help="sequences per micro-batch (0: the whole batch)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20, help="timed steps, after --warmup")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the ceiling MFU is taken against")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = Llama(*PRESETS[a.preset]).to(dev)
    params = sum(p.numel() for p in model.parameters())
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )
    fwd = torch.compile(model) if a.compile else model
    micro = a.micro or a.batch
    accum = a.batch // micro
    vocab = PRESETS[a.preset][0]
    tokens = torch.randint(0, vocab, (a.batch, a.seq + 1), device=dev)
    chunks = [(tokens[i : i + micro, :-1], tokens[i : i + micro, 1:]) for i in range(0, a.batch, micro)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, compile_s = [], None
    for i in range(a.warmup + a.steps):
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for inputs, targets in chunks:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = fwd(inputs)
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        sync()
        elapsed = time.perf_counter() - start
        if i == 0:
            compile_s = elapsed
        if i >= a.warmup:
            times.append(elapsed)
    step = statistics.median(times)
    tps = a.batch * a.seq / step
    fpt = flops_per_token(model, a.preset, a.seq)
    out = {
        "system": "pytorch-compile" if a.compile else "pytorch-eager",
        "preset": a.preset, "params": params, "batch": a.batch, "micro": micro, "seq": a.seq,
        "median_step_s": round(step, 4), "tokens_per_s": round(tps, 1),
        "tflops": float(f"{tps * fpt / 1e12:.4g}"),
        "mfu": round(tps * fpt / (a.peak_tflops * 1e12), 4) if a.peak_tflops else None,
        "first_step_s": round(compile_s, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "torch": torch.__version__,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
