"""Kiln's data-parallel scaling model: from a measured single-device step (forward, backward,
optimizer seconds) and a collective's bandwidth and latency, the step time, tokens/s and MFU
at N devices, with the gradient buckets and the overlap Kiln actually uses.

What Kiln does (worker/src/parallel.rs): gradients are one fp32 buffer laid out embedding,
blocks 0..L-1, head; backward completes the head first, then the blocks from the last, then
the embedding; consecutive segments are grouped into buckets of at least `bucket_mb` MiB
(filled from the head); a bucket is all-reduced on a communication thread the moment its
last segment is final, one bucket at a time, while backward goes on; with gradient
accumulation only the last micro-batch communicates. After the last bucket: the gradient
norm (one 8-byte all-reduce), the AdamW update, the loss (one 8-byte all-reduce); before the
step the ledger hash (one 8-byte all-reduce).

The model:
  t_bucket(b)  = 2 (N - 1) / N * b / busbw + lat(N)        (ring bandwidth term)
  lat(N)       = 2 * ceil(log2 N) * alpha                  (tree/NVLS latency, as NCCL picks
                                                              for small messages at scale)
  ready(k)     = t_bwd_last * (share of backward done when bucket k's last segment is)
  end(k)       = max(ready(k), end(k - 1)) + t_bucket(k)
  exposed      = max(0, end(last) - t_bwd_last)
  step(N)      = t_fwd + t_bwd + exposed + t_opt + 3 lat(N)
Backward time is split over segments in proportion to their matmul FLOPs (attention scores
included). Without tensor parallelism Kiln computes the head's gradients during the forward
pass (the chunked loss), so the head's segment is final when backward starts and its FLOPs
count in forward; the tied embedding's gradient is only final when the embedding lookup's
backward is, i.e. at the very end. Global batch grows with N (the per-device batch is the measured one).

  python3 benches/scaling.py --from-json runs/gpu-check/kiln-1b.json   # a GPU check's run
  python3 benches/scaling.py --preset 1b --seq 2048 --micro 8 --step-s 0.5 --fwd-s 0.15 \
      --bwd-s 0.3 --opt-s 0.05 --tokens 16384
  python3 benches/scaling.py --preset 1b --assume-mfu 0.4 --peak-tflops 790 --tokens 16384 \
      --opt-s 0.017                                          # before a measurement exists
  python3 benches/scaling.py --check-cpu runs/e2e-demo      # the model against a measured
                                                             # 2-process CPU run
"""
import argparse
import json
import math
import os
import statistics
import sys

# name: (vocab, dim, layers, heads, kv_heads, ffn, tied), as worker/src/config.rs.
PRESETS = {
    "demo": (50257, 128, 4, 4, 2, 384, True),
    "125m": (50257, 768, 12, 12, 12, 2048, True),
    "1b": (128256, 2048, 16, 32, 8, 8192, True),
    "8b": (128256, 4096, 32, 32, 8, 14336, False),
}

# Networks the projections are stated at: (name, devices, bus bandwidth GB/s per device,
# alpha seconds per latency step). Intra-node: NVLink 4 (H100/H200 SXM, 900 GB/s
# bidirectional; nccl-tests all-reduce bus bandwidth about 360-480 GB/s on 8 GPUs). Across
# nodes: one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s; about 45 GB/s achieved), or a
# 100 Gb/s Ethernet NIC per node shared by 8 GPUs (12.5 / 8 GB/s per GPU).
NETWORKS = [
    ("8 GPUs, one node, NVLink 4", 8, 360.0, 3e-6),
    ("64 GPUs, 8 nodes, 8x400 Gb/s IB per node", 64, 45.0, 8e-6),
    ("1,024 GPUs, 128 nodes, 8x400 Gb/s IB per node", 1024, 45.0, 8e-6),
    ("64 GPUs, 8 nodes, 1x100 Gb/s Ethernet per node", 64, 12.5 / 8, 25e-6),
]


def segments(preset, seq):
    """(params, backward FLOPs per token) of each gradient segment in buffer order:
    embedding, blocks, head (norm included)."""
    vocab, dim, layers, heads, kv, ffn, tied = PRESETS[preset]
    hd = dim // heads
    block = dim * heads * hd + 2 * dim * kv * hd + heads * hd * dim + 3 * dim * ffn + 2 * dim
    block_flops = 4 * (block - 2 * dim) + 8 * heads * hd * seq  # backward: 2x forward
    head_params = dim + (0 if tied else vocab * dim)
    # The head's backward runs inside the forward pass (the chunked loss): none of it is
    # left in the backward pass that hides the all-reduce.
    head_flops = 0
    embed = vocab * dim
    return [(embed, 0)] + [(block, block_flops)] * layers + [(head_params, head_flops)]


def buckets(segs, bucket_bytes):
    """Kiln's plan_buckets: from the last segment backwards, at least bucket_bytes each.
    Returns (bytes, index of the first segment) per bucket, in the order backward finishes
    them."""
    out, end = [], len(segs)
    while end > 0:
        start, size = end, 0
        while start > 0 and (size < bucket_bytes or start == end):
            start -= 1
            size += 4 * segs[start][0]
        out.append((size, start))
        end = start
    return out


def project(preset, seq, t_fwd, t_bwd, t_opt, n, busbw, alpha, bucket_mb=25.0, accum=1, single_step=None):
    """Step seconds and exposed communication at n devices."""
    base = single_step if single_step else t_fwd + t_bwd + t_opt
    if n == 1:
        return {"step_s": base, "exposed_s": 0.0, "comm_s": 0.0}
    segs = segments(preset, seq)
    lat = 2 * math.ceil(math.log2(n)) * alpha
    flops = [f for _, f in segs]
    total = sum(flops)
    # Backward of the last micro-batch: the head first, then the blocks from the last; the
    # embedding's segment (tied: the output head's table too) is final only at the end.
    t_last = t_bwd / accum
    done_at = {}
    acc = 0.0
    for s in range(len(segs) - 1, -1, -1):
        acc += flops[s]
        done_at[s] = t_last * acc / total
    done_at[0] = t_last
    end, comm = 0.0, 0.0
    for size, first in buckets(segs, bucket_mb * (1 << 20)):
        t = 2 * (n - 1) / n * size / (busbw * 1e9) + lat
        comm += t
        end = max(done_at[first], end) + t
    exposed = max(0.0, end - t_last)
    return {"step_s": base + exposed + 3 * lat, "exposed_s": exposed + 3 * lat, "comm_s": comm}


def flops_per_token(preset, seq):
    vocab, dim, layers, heads, kv, ffn, tied = PRESETS[preset]
    n = sum(p for p, _ in segments(preset, seq))
    if not tied:
        n -= vocab * dim
    return 6 * n + 12 * layers * heads * (dim // heads) * seq


def table(a, t_fwd, t_bwd, t_opt, step, tokens, peak, source="measured"):
    fpt = flops_per_token(a.preset, a.seq)
    one = tokens / step
    print(f"preset {a.preset}, {tokens} tokens per device per step, {source} step {step:.4f} s "
          f"(forward {t_fwd:.4f}, backward {t_bwd:.4f}, optimizer {t_opt:.4f}), "
          f"{one:,.0f} tokens/s on one device, buckets {a.bucket_mb} MiB, "
          f"{len(buckets(segments(a.preset, a.seq), a.bucket_mb * (1 << 20)))} buckets")
    print()
    print("| network | devices | bus bandwidth per device | all-reduce busy | exposed | step | tokens/s | scaling efficiency | MFU | limited by |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, bw, alpha in NETWORKS:
        p = project(a.preset, a.seq, t_fwd, t_bwd, t_opt, n, bw, alpha, a.bucket_mb, a.accum, step)
        tps = n * tokens / p["step_s"]
        eff = tps / (n * one)
        mfu = tps * fpt / (n * peak * 1e12) if peak else float("nan")
        last = buckets(segments(a.preset, a.seq), a.bucket_mb * (1 << 20))[-1][0]
        t_last_bucket = 2 * (n - 1) / n * last / (bw * 1e9)
        if p["exposed_s"] < 0.02 * step:
            limit = "compute (communication hidden under backward)"
        elif t_last_bucket > 0.5 * p["exposed_s"]:
            limit = f"the last bucket ({last / 2**20:.0f} MiB, embedding) after backward"
        else:
            limit = "bandwidth: all-reduce longer than backward"
        print(f"| {name} | {n} | {bw:g} GB/s | {p['comm_s'] * 1e3:.1f} ms | {p['exposed_s'] * 1e3:.1f} ms | "
              f"{p['step_s'] * 1e3:.1f} ms | {tps:,.0f} | {eff:.1%} | {mfu:.1%} | {limit} |")


def check_cpu(a):
    """The model at n = 2 against a measured 2-process Kiln run on loopback TCP
    (benches/e2e.sh output): predicted exposed collective time vs the measured one."""
    d = a.check_cpu
    meta = json.load(open(os.path.join(d, "meta.json")))
    runs = sorted(x for x in os.listdir(d) if x.startswith("kiln-r") and os.path.isdir(os.path.join(d, x)))
    steps = [json.loads(l) for l in open(os.path.join(d, runs[-1], "metrics.jsonl"))]
    steps = [s for s in steps if s.get("type") == "step"][10:]
    ph = {k: statistics.fmean(s["phases"][k] for s in steps) for k in steps[0]["phases"]}
    accum = meta["batch"] // (2 * meta["micro"])
    p = project(meta["size"], meta["seq_len"], ph["forward"], ph["backward"], ph["optimizer"],
                2, a.busbw, a.alpha, a.bucket_mb, accum)
    print(json.dumps({"measured_collective_wait_s": round(ph["collective"], 5),
                      "predicted_exposed_s": round(p["exposed_s"], 5),
                      "predicted_allreduce_busy_s": round(p["comm_s"], 5),
                      "busbw_GBps": a.busbw, "phases_s": {k: round(v, 5) for k, v in ph.items()}}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-json", help="a kiln-PRESET.json of benches/gpu/check.sh")
    ap.add_argument("--check-cpu", help="a benches/e2e.sh output directory")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--step-s", type=float)
    ap.add_argument("--fwd-s", type=float)
    ap.add_argument("--bwd-s", type=float)
    ap.add_argument("--opt-s", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, help="tokens per device per step")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--assume-mfu", type=float, help="no measured step: derive it from this MFU")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--busbw", type=float, default=2.0, help="GB/s, for --check-cpu")
    ap.add_argument("--alpha", type=float, default=50e-6, help="seconds, for --check-cpu")
    a = ap.parse_args()
    if a.check_cpu:
        return check_cpu(a)
    if a.from_json:
        r = json.load(open(a.from_json))
        a.preset, a.seq = r["preset"], r["seq"]
        a.accum = r["batch"] // r["micro"]
        ph = r["phases_s"]
        peak = r["tflops"] / r["mfu"] if r.get("mfu") else a.peak_tflops
        return table(a, ph["forward"], ph["backward"], ph["optimizer"], r["median_step_s"], r["batch"] * r["seq"], peak)
    if a.assume_mfu:
        if not (a.peak_tflops and a.tokens):
            sys.exit("error: --assume-mfu needs --peak-tflops and --tokens")
        fpt = flops_per_token(a.preset, a.seq)
        step = a.tokens * fpt / (a.assume_mfu * a.peak_tflops * 1e12)
        # MFU over the whole step, the optimizer included, is what is assumed. Forward is a
        # third of the FLOPs plus the head's backward, which Kiln's chunked loss does during
        # the forward pass; backward is the rest.
        compute = step - a.opt_s
        bwd_share = sum(f for _, f in segments(a.preset, a.seq)) / fpt
        source = (f"assumed ({a.assume_mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s, "
                  f"split by FLOPs: backward {bwd_share:.0%} of compute)")
        return table(a, compute * (1 - bwd_share), compute * bwd_share, a.opt_s, step, a.tokens,
                     a.peak_tflops, source)
    if not (a.step_s and a.fwd_s and a.bwd_s and a.tokens):
        sys.exit("error: give --from-json, --check-cpu, or --step-s, --fwd-s, --bwd-s and --tokens")
    table(a, a.fwd_s, a.bwd_s, a.opt_s, a.step_s, a.tokens, a.peak_tflops)


if __name__ == "__main__":
    main()
