"""The peer of benches/train_step.rs: one training step of the same Llama shape in plain
PyTorch (F.scaled_dot_product_attention, F.rms_norm, torch.optim.AdamW with its default
implementation, clip_grad_norm_), same batch, same thread count. Prints one JSON line.

  train_step_torch.py [PRESET] [BATCH] [SEQ] [STEPS] [THREADS]
"""
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = {
    # vocab, dim, layers, heads, kv_heads, ffn, tied
    "tiny": (50257, 64, 2, 4, 2, 192, True),
    "demo": (50257, 128, 4, 4, 2, 384, True),  # jobs/shakespeare-demo.toml
    "125m": (50257, 768, 12, 12, 12, 2048, True),
    "1b": (128256, 2048, 16, 32, 8, 8192, True),  # Llama 3.2 1B's shape
}


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.mlp_norm = nn.Parameter(torch.ones(dim))
        self.q = nn.Linear(dim, heads * self.hd, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, dim, bias=False)
        self.gate = nn.Linear(dim, ffn, bias=False)
        self.up = nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = F.rms_norm(x, (d,), self.attn_norm, 1e-5)
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads
        )
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = F.rms_norm(x, (d,), self.mlp_norm, 1e-5)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Llama(nn.Module):
    def __init__(self, vocab, dim, layers, heads, kv_heads, ffn, tied):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        hd = dim // heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        freqs = torch.outer(torch.arange(t, dtype=torch.float32, device=tokens.device), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(F.rms_norm(x, (x.shape[-1],), self.norm, 1e-5))


def main():
    args = sys.argv[1:]
    preset = args[0] if len(args) > 0 else "125m"
    batch = int(args[1]) if len(args) > 1 else 4
    seq = int(args[2]) if len(args) > 2 else 256
    steps = int(args[3]) if len(args) > 3 else 5
    threads = int(args[4]) if len(args) > 4 else 2
    precision = args[5] if len(args) > 5 else "fp32"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Llama(*PRESETS[preset])
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    tokens = torch.randint(0, PRESETS[preset][0], (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        loss.item()
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        end = time.perf_counter()
        if i >= 2:
            times.append((end - start, backward_done - start, end - backward_done))
    times.sort()
    median, fwd_bwd, optim = times[len(times) // 2]
    print(json.dumps({
        "system": "pytorch", "preset": preset, "params": params, "batch": batch, "seq": seq,
        "threads": threads, "median_step_s": round(median, 4),
        "forward_backward_s": round(fwd_bwd, 4), "optimizer_s": round(optim, 4),
        "tokens_per_s": round(batch * seq / median, 1), "torch": torch.__version__,
        "precision": {torch.bfloat16: "bf16", torch.float32: "fp32"}[logits.dtype],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
