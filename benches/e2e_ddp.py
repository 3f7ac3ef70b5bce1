"""The peer of benches/e2e.sh: the same Llama pre-training job as `kiln local JOB --workers 2`,
written as plain PyTorch DDP (gloo) under torchrun, plus the helpers the script uses.

  e2e_ddp.py init --size S --out DIR [--seed N]
      A seeded transformers LlamaForCausalLM of the size's shape, saved as a Hugging Face
      directory: the starting weights of both systems (Kiln reads it with `init_from`).
  torchrun --nproc-per-node 2 e2e_ddp.py train --model DIR --data DIR --out JSON [...]
      Trains it with DistributedDataParallel (with --fsdp: FSDP2's `fully_shard` on every
      decoder layer and the root, parameters and gradients in fp32): Kiln's data order (reproduced from
      shard-loader/src/order.rs and rng.rs, so both read the same samples at every step),
      AdamW with Kiln's schedule, decay groups and clipping, fp32. Rank 0 writes per-step
      losses, wall-clock times, phase times and the ledger hash of every step.
  e2e_ddp.py measure --label L --out JSON -- CMD...
      Runs CMD and polls VmHWM (peak resident memory) of every process below it, every
      0.25 s, until it exits.
  e2e_ddp.py summarize --dir DIR --skip N
      Reads the runs of DIR, prints one JSON line per run and a Markdown row.

Each training process uses OMP_NUM_THREADS threads (the script sets it to Kiln's share).
"""
import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

M64 = (1 << 64) - 1

# name: (dim, layers, heads, kv_heads, ffn). GPT-2 vocabulary, tied embeddings, rope theta
# 1e4, RMSNorm eps 1e-5: Kiln's small presets.
SIZES = {
    "demo": (128, 4, 4, 2, 384),  # jobs/shakespeare-demo.toml
    "wide": (256, 8, 8, 4, 768),
    "125m": (768, 12, 12, 12, 2048),  # the `125m` preset
}


# ---------------------------------------------------------------- Kiln's sample order


class SplitMix64:
    def __init__(self, seed):
        self.s = seed & M64

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(self, n):
        zone = M64 - M64 % n
        while True:
            x = self.next()
            if x < zone:
                return x % n


def mix(values):
    h, acc = SplitMix64(0x6B696C6E), 0
    for v in values:
        acc ^= v
        h.s ^= acc
        acc = h.next()
    return acc


def permutation(n, seed):
    p, r = list(range(n)), SplitMix64(seed)
    for i in range(n - 1, 0, -1):
        j = r.below(i + 1)
        p[i], p[j] = p[j], p[i]
    return p


def sample_hash(epoch, sequence):
    return mix([0x1ED6E5, epoch, sequence])


class KilnOrder:
    """Global sample i of a dataset, as Kiln's StreamingLoader reads it: blocks (row groups)
    in a seeded permutation per epoch, cut into seq_len + 1 windows, shuffled within windows
    of `shuffle_window` sequences."""

    def __init__(self, blocks, seq_len, seed, shuffle_window=4096):
        import numpy as np

        self.np = np
        self.blocks, self.seq_len, self.seed, self.w = blocks, seq_len, seed, shuffle_window
        self.total = sum(len(b) for b in blocks)
        self.n = (self.total - 1) // seq_len
        self.epoch_stream = None
        self.window = None

    def sample(self, i):
        epoch, pos = divmod(i, self.n)
        window = pos // self.w
        start = window * self.w
        if self.window is None or self.window[:2] != (epoch, window):
            length = min(self.w, self.n - start)
            perm = permutation(length, mix([self.seed, epoch, window, 0x5E0]))
            self.window = (epoch, window, perm)
        seq = start + self.window[2][pos - start]
        if self.epoch_stream is None or self.epoch_stream[0] != epoch:
            order = permutation(len(self.blocks), mix([self.seed, epoch, 0xB10C]))
            self.epoch_stream = (epoch, self.np.concatenate([self.blocks[b] for b in order]))
        tokens = self.epoch_stream[1][seq * self.seq_len : (seq + 1) * self.seq_len + 1]
        return tokens, sample_hash(epoch, seq)


def load_blocks(data_dir):
    """Every row group of the train split, in manifest order, as one int64 array each."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
    column = manifest.get("token_column", "tokens")
    blocks = []
    for shard in manifest["train"]["shards"]:
        f = pq.ParquetFile(os.path.join(data_dir, shard["path"]))
        for g in range(f.num_row_groups):
            col = f.read_row_group(g, columns=[column]).column(column).combine_chunks()
            blocks.append(np.asarray(col.flatten(), dtype=np.int64))
        assert [len(b) for b in blocks[-f.num_row_groups :]] == shard["row_group_tokens"]
    return blocks


# ---------------------------------------------------------------- init


def hf_config(size, max_seq_len=2048):
    from transformers import LlamaConfig

    dim, layers, heads, kv, ffn = SIZES[size]
    return LlamaConfig(
        vocab_size=50257,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=dim // heads,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=50256,
        eos_token_id=50256,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
    )


def cmd_init(a):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(hf_config(a.size)).float()
    model.save_pretrained(a.out)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"size": a.size, "params": params, "out": a.out}))


# ---------------------------------------------------------------- train (under torchrun)


def lr_at(step, lr, warmup, total, min_ratio):
    """Kiln's LrSchedule::at, cosine."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    p = min(max((step - warmup) / span, 0.0), 1.0)
    floor = lr * min_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


def cmd_train(a):
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaForCausalLM

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert a.batch % (world * a.micro) == 0
    accum = a.batch // (world * a.micro)
    order = KilnOrder(load_blocks(a.data), a.seq_len, a.seed)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    params = sum(p.numel() for p in model.parameters())
    if a.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ddp = model
    else:
        ddp = DDP(model)
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    # The last gradient accumulated ends backward's compute; what backward() takes after it
    # is DDP waiting for its all-reduce (and copying the buckets back into the gradients).
    last_grad = [0.0]

    def grad_done(_p):
        last_grad[0] = time.perf_counter()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(grad_done)

    rows = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, a.lr, a.warmup, a.steps, a.min_lr_ratio)
        batches, step_hash = [], 0
        for m in range(accum):
            first = step * a.batch + (m * world + rank) * a.micro
            samples = [order.sample(i) for i in range(first, first + a.micro)]
            w = torch.from_numpy(np.stack([s[0] for s in samples]))
            batches.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        # The step's ledger hash (all ranks' samples), computed here without communication.
        if rank == 0:
            for i in range(step * a.batch, (step + 1) * a.batch):
                step_hash = (step_hash + order.sample(i)[1]) & M64
        phases = dict(data_wait=time.perf_counter() - t0, forward=0.0, backward=0.0, collective=0.0)
        loss_sum = 0.0
        for m, (inputs, targets) in enumerate(batches):
            f0 = time.perf_counter()
            if a.fsdp:
                # As Kiln's fully sharded runs: every micro-batch reduce-scatters.
                ctx = contextlib.nullcontext()
            else:
                ctx = ddp.no_sync() if m + 1 < accum else contextlib.nullcontext()
            with ctx:
                logits = ddp(input_ids=inputs, use_cache=False).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) / accum
                f1 = time.perf_counter()
                loss.backward()
                b1 = time.perf_counter()
            loss_sum += loss.item()
            phases["forward"] += f1 - f0
            compute_end = max(min(last_grad[0], b1), f1)
            phases["backward"] += compute_end - f1
            phases["collective"] += b1 - compute_end
        o0 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean_loss = torch.tensor([loss_sum])
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / world
        end = time.perf_counter()
        phases["optimizer"] = end - o0
        phases["checkpoint"] = 0.0
        rows.append(
            dict(step=step + 1, loss=mean_loss, lr=lr, grad_norm=float(norm), time=time.time(),
                 step_s=end - t0, phases=phases, hash=step_hash)
        )
        if rank == 0 and ((step + 1) % 10 == 0 or step + 1 == a.steps):
            print(f"step {step + 1}/{a.steps} | loss {mean_loss:.4f} | {end - t0:.3f} s/step", flush=True)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({"params": params, "world": world, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "steps": rows}, f)
    # Every rank is done before any tears down: gloo's destroy_process_group on one rank
    # while the other has already exited was seen to hang (rank 0 waiting on a futex for
    # minutes after its last step).
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- measure


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _status(pid):
    """(VmHWM in KiB, threads, CPU seconds so far) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        ticks = stat[stat.rindex(")") + 2 :].split()
        cpu_s = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")
        return int(fields["VmHWM"].split()[0]), int(fields["Threads"]), cpu_s
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _omp_threads(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(b"OMP_NUM_THREADS="):
                    return var.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
    except OSError:
        return None


def cmd_measure(a):
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    log = open(a.log, "w") if a.log else None
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log else None)
    seen = {}  # pid -> {argv, ppid, hwm_kib}
    while True:
        done = proc.poll() is not None
        kids = _children_map()
        stack, tree = [(proc.pid, None)], []
        while stack:
            pid, parent = stack.pop()
            tree.append((pid, parent))
            stack.extend((k, pid) for k in kids.get(pid, []))
        for pid, parent in tree:
            st = _status(pid)
            if st is None:
                continue
            entry = seen.get(pid)
            if entry is None:
                argv = _cmdline(pid)
                if argv is None:
                    continue
                entry = seen[pid] = {"pid": pid, "ppid": parent, "argv": argv, "hwm_kib": 0, "threads": 0}
            elif entry["argv"] != (_cmdline(pid) or entry["argv"]):
                # exec'd since we last looked: take the new command line
                entry["argv"] = _cmdline(pid) or entry["argv"]
            entry["hwm_kib"] = max(entry["hwm_kib"], st[0])
            entry["threads"] = max(entry["threads"], st[1])
            entry["cpu_s"] = st[2]
            entry["omp_num_threads"] = _omp_threads(pid)
        if done:
            break
        time.sleep(0.25)
    rc = proc.returncode
    procs = []
    for e in seen.values():
        argv = e["argv"]
        if a.label.startswith("kiln"):
            train = "--supervised" in argv and "train" in argv
        else:
            train = e["ppid"] == proc.pid
        e["role"] = "train" if train else "launcher"
        procs.append(e)
    out = {"label": a.label, "rc": rc, "wall_s": time.time() - start, "cmd": cmd, "processes": procs}
    with open(a.out, "w") as f:
        json.dump(out, f)
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd)} exited with {rc}" + (f"; see {a.log}" if a.log else ""))


# ---------------------------------------------------------------- summarize


def _steady(steps, skip, tokens_per_step):
    """Throughput and mean phases over steps skip+1..N, from wall-clock step end times."""
    by = {s["step"]: s for s in steps}
    last = max(by)
    first = by[skip]
    window = [by[s] for s in range(skip + 1, last + 1)]
    elapsed = by[last]["time"] - first["time"]
    phases = {k: statistics.fmean(s["phases"][k] for s in window) for k in window[0]["phases"]}
    losses = [by[s]["loss"] for s in range(max(1, last - 9), last + 1)]
    return {
        "tokens_per_s": len(window) * tokens_per_step / elapsed,
        "step_s": elapsed / len(window),
        "phases_s": phases,
        "loss_final": by[last]["loss"],
        "loss_last10_mean": statistics.fmean(losses),
    }


def _short(argv):
    """`kiln local`, `kiln worker`, `torchrun`: what a launcher process is."""
    names = [os.path.basename(x) for x in argv[:2]]
    return names[1] if names[0].startswith("python") and len(names) > 1 else " ".join(names)


def _memory(measure):
    train = [p for p in measure["processes"] if p["role"] == "train"]
    other = [p for p in measure["processes"] if p["role"] != "train"]
    mib = lambda k: round(k / 1024, 1)
    return {
        "train_peak_rss_mib": sorted(mib(p["hwm_kib"]) for p in train),
        "launcher_peak_rss_mib": [[_short(p["argv"]), mib(p["hwm_kib"])] for p in other],
        "train_processes": len(train),
        "train_omp_num_threads": sorted({p.get("omp_num_threads") or "unset" for p in train}),
        "train_os_threads": sorted(p.get("threads", 0) for p in train),
        "train_cpu_s": sorted(round(p.get("cpu_s", 0.0), 1) for p in train),
    }


def _phase_str(ph, step_s):
    names = [("data_wait", "data"), ("forward", "fwd"), ("backward", "bwd"), ("collective", "coll"),
             ("optimizer", "opt")]
    return ", ".join(f"{short} {ph[k] * 1000:.0f}" for k, short in names) + f" ms (step {step_s * 1000:.0f} ms)"


def cmd_summarize(a):
    d = a.dir
    meta = json.load(open(os.path.join(d, "meta.json")))
    tokens_per_step = meta["batch"] * meta["seq_len"]
    runs = []
    for name in sorted(os.listdir(d)):
        m = re.fullmatch(r"([a-z0-9-]+)-r(\d+)\.measure\.json", name)
        if not m:
            continue
        system, rnd = m.group(1), int(m.group(2))
        measure = json.load(open(os.path.join(d, name)))
        if system.startswith("kiln"):
            out = os.path.join(d, f"{system}-r{rnd}")
            steps = []
            for line in open(os.path.join(out, "metrics.jsonl")):
                e = json.loads(line)
                if e.get("type") == "step":
                    assert e["window_steps"] == 1, "the Kiln job must log every step"
                    steps.append(e)
            hashes = [json.loads(l)["hash"] for l in open(os.path.join(out, "ledger.jsonl"))]
            extra = {}
        else:
            res = json.load(open(os.path.join(d, f"{system}-r{rnd}.json")))
            steps = res["steps"]
            hashes = [s["hash"] for s in steps]
            extra = {"torch": res["torch"], "threads": res["threads"]}
        r = {"system": system, "round": rnd, "size": meta["size"], "steps": len(steps), "skip": a.skip,
             **_steady(steps, a.skip, tokens_per_step), **_memory(measure), "wall_s": round(measure["wall_s"], 1),
             "ledger": hashes, **extra}
        runs.append(r)
    # Both systems must have read the same samples at every step.
    ledgers = {tuple(r.pop("ledger")) for r in runs}
    same_samples = len(ledgers) == 1
    for r in runs:
        r["same_samples_as_other_runs"] = same_samples
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    best = {}
    known = ["kiln", "kiln-fsdp", "ddp", "fsdp2"]
    order = sorted({r["system"] for r in runs}, key=lambda s: (known.index(s) if s in known else len(known), s))
    for s in order:
        best[s] = max((r for r in runs if r["system"] == s), key=lambda r: r["tokens_per_s"])
    if set(best) != {"kiln", "ddp"}:
        _table(meta, runs, best)
        return
    k, p = best["kiln"], best["ddp"]
    mean = lambda s: statistics.fmean(r["tokens_per_s"] for r in runs if r["system"] == s)
    rss = lambda r: "/".join(f"{x:.0f}" for x in r["train_peak_rss_mib"]) + " MiB"
    summary = {
        "kiln_tokens_per_s_best": round(k["tokens_per_s"], 1), "ddp_tokens_per_s_best": round(p["tokens_per_s"], 1),
        "ratio_best": round(k["tokens_per_s"] / p["tokens_per_s"], 3),
        "kiln_tokens_per_s_mean": round(mean("kiln"), 1), "ddp_tokens_per_s_mean": round(mean("ddp"), 1),
        "ratio_mean": round(mean("kiln") / mean("ddp"), 3), "same_samples": same_samples,
        "target_met": k["tokens_per_s"] >= 1.1 * p["tokens_per_s"]
        and max(k["train_peak_rss_mib"]) < min(p["train_peak_rss_mib"]),
    }
    print(json.dumps({"summary": summary}))
    print()
    print("| date | machine | command | Kiln tokens/s | DDP tokens/s | Kiln / DDP | peak RSS per training process, Kiln | DDP | "
          "Kiln step (per step, steady) | DDP step | loss at the end, Kiln (last-10 mean) | DDP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {meta['date']} | {meta['machine']} | `{meta['command']}` | {k['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | "
          f"{k['tokens_per_s'] / p['tokens_per_s']:.2f}x | {rss(k)} | {rss(p)} | {_phase_str(k['phases_s'], k['step_s'])} | "
          f"{_phase_str(p['phases_s'], p['step_s'])} | {k['loss_final']:.4f} ({k['loss_last10_mean']:.4f}) | "
          f"{p['loss_final']:.4f} ({p['loss_last10_mean']:.4f}) |")


def _table(meta, runs, best):
    """Any set of systems: each one's best round, against the first system's."""
    mean = lambda s: statistics.fmean(r["tokens_per_s"] for r in runs if r["system"] == s)
    first = next(iter(best))
    print(json.dumps({"summary": {s: {"tokens_per_s_best": round(r["tokens_per_s"], 1),
                                       "tokens_per_s_mean": round(mean(s), 1)} for s, r in best.items()}}))
    print()
    print(f"{meta['date']}, {meta['machine']}, `{meta['command']}`:")
    print()
    print(f"| system | tokens/s (best round) | mean of rounds | vs {first} | peak RSS per training process | "
          "step (per step, steady) | loss at the end (last-10 mean) |")
    print("|---|---|---|---|---|---|---|")
    for s, r in best.items():
        rss = "/".join(f"{x:.0f}" for x in r["train_peak_rss_mib"]) + " MiB"
        print(f"| {s} | {r['tokens_per_s']:.0f} | {mean(s):.0f} | {r['tokens_per_s'] / best[first]['tokens_per_s']:.2f}x | "
              f"{rss} | {_phase_str(r['phases_s'], r['step_s'])} | {r['loss_final']:.4f} ({r['loss_last10_mean']:.4f}) |")


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init")
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p = sub.add_parser("train")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--fsdp", action="store_true")
    p = sub.add_parser("measure")
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("summarize")
    p.add_argument("--dir", required=True)
    p.add_argument("--skip", type=int, default=10)
    a = ap.parse_args()
    {"init": cmd_init, "train": cmd_train, "measure": cmd_measure, "summarize": cmd_summarize}[a.command](a)


if __name__ == "__main__":
    main()
